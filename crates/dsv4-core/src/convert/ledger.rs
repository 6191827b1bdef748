//! Byte accounting of the converter's buffers: every read and every produced output goes through
//! a [`Buf`] that counts itself while alive, so the peak the converter ever holds is known
//! exactly (and tested), independent of the allocator and of timing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Live and peak bytes of buffers.
#[derive(Clone, Default)]
pub struct Ledger(Arc<(AtomicU64, AtomicU64)>);

impl Ledger {
    /// A zeroed buffer of `n` bytes, counted until dropped.
    pub fn alloc(&self, n: usize) -> Buf {
        self.track(vec![0u8; n])
    }

    /// Counts an existing vector (its capacity) until dropped.
    pub fn track(&self, v: Vec<u8>) -> Buf {
        let n = v.capacity() as u64;
        let live = self.0 .0.fetch_add(n, Ordering::SeqCst) + n;
        self.0 .1.fetch_max(live, Ordering::SeqCst);
        Buf {
            v,
            n,
            ledger: self.clone(),
        }
    }

    /// Largest number of bytes ever held at once.
    pub fn peak(&self) -> u64 {
        self.0 .1.load(Ordering::SeqCst)
    }

    /// Bytes held now.
    pub fn live(&self) -> u64 {
        self.0 .0.load(Ordering::SeqCst)
    }
}

/// A counted byte buffer.
pub struct Buf {
    v: Vec<u8>,
    n: u64,
    ledger: Ledger,
}

impl AsRef<[u8]> for Buf {
    fn as_ref(&self) -> &[u8] {
        &self.v
    }
}

impl AsMut<[u8]> for Buf {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.v
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        self.ledger.0 .0.fetch_sub(self.n, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_live_and_peak() {
        let l = Ledger::default();
        let a = l.alloc(100);
        {
            let _b = l.alloc(50);
            assert_eq!(l.live(), 150);
        }
        assert_eq!(l.live(), 100);
        drop(a);
        assert_eq!((l.live(), l.peak()), (0, 150));
    }
}
