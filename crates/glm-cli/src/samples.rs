//! Sample generations at the end of a training run: a [gMASK] continuation in English and in
//! Chinese, and a [MASK] fill, printed and written to OUT/samples.txt. They are sampled with
//! GLM-130B's default strategy (temperature 1, top-p 0.7, seed 1234) and at least 8 tokens:
//! greedy decoding of a small model mostly repeats itself, and its instruction data taught it to
//! end short prompts early.

use std::path::Path;

use anyhow::{Context, Result};
use glm_infer::{Generator, SamplingConfig};
use glm_model::Glm;
use glm_tokenizer::Tokenizer;

const PROMPTS: [(&str, &str); 3] = [
    ("[gMASK] continuation, English", "The President said that the nation"),
    ("[gMASK] continuation, Chinese", "中国人民"),
    ("[MASK] fill", "The whale swam [MASK] the ship and the sea."),
];

pub fn print_samples(model: &Glm, tok: &Tokenizer, out: &Path) -> Result<()> {
    let g = Generator::new(model, tok)?;
    let cfg = SamplingConfig { max_new_tokens: 40, min_new_tokens: 8, ..SamplingConfig::default() };
    let mut text = String::new();
    for (what, prompt) in PROMPTS {
        let r = if what.starts_with("[MASK]") { g.fill(prompt, &cfg) } else { g.complete(prompt, &cfg) };
        let line = match r {
            Ok(gen) => format!("{what}:\n  prompt: {prompt}\n  output: {}\n", gen.text.replace('\n', "\\n")),
            Err(e) => format!("{what}:\n  prompt: {prompt}\n  error: {e}\n"),
        };
        eprint!("{line}");
        text.push_str(&line);
    }
    let p = out.join("samples.txt");
    glm_checkpoint::write_atomic(&p, text.as_bytes()).with_context(|| format!("writing {}", p.display()))?;
    Ok(())
}
