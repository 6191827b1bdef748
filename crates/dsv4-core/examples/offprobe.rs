use dsv4_core::numerics::Numerics;
use dsv4_core::{synthetic, Logits, Model, ModelConfig};
fn main() {
    let mut j = synthetic::flash_config_json();
    let over = serde_json::json!({"vocab_size": 1000, "hidden_size": 512, "num_hidden_layers": 5,
        "compress_ratios": [0, 4, 128, 4, 16, 0], "num_hash_layers": 2, "n_routed_experts": 16,
        "moe_intermediate_size": 256, "index_topk": 128, "o_groups": 4, "o_lora_rank": 128,
        "num_attention_heads": 8, "q_lora_rank": 256, "index_n_heads": 8, "index_head_dim": 128});
    for (k, v) in over.as_object().unwrap() {
        j[k] = v.clone();
    }
    let cfg = ModelConfig::from_json(&j).unwrap();
    let ck = synthetic::checkpoint(cfg, 3).unwrap();
    let mut cpu = Model::load(&ck).unwrap();
    cpu.numerics = Numerics::Official { act_quant: false };
    let ids: Vec<u32> = (0..300).map(|i| (i * 7919 % 997) as u32 + 1).collect();
    let mut cache = cpu.new_cache();
    let want = cpu.forward(&mut cache, &ids, Logits::All).unwrap();
    let bytes: Vec<u8> = want.iter().flat_map(|f| f.to_le_bytes()).collect();
    std::fs::write(std::env::args().nth(1).unwrap(), bytes).unwrap();
}
