//! Generation on a tiny random model with the default tokenizer.

use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};
use glm_data::objective::{self, Mode, ObjectiveConfig, ObjectiveIds, PositionKind, Sample};
use glm_infer::sampling::argmax;
use glm_infer::{Blank, Decoder, Error, Generator, SamplingConfig, StopReason};
use glm_model::{Config, Glm};
use glm_nn::{AttnLayout, DenseFactory};
use glm_tokenizer::Tokenizer;
use rand::SeedableRng;

mod common;
use common::configs;

fn model(cfg: &Config, seed: u64) -> Result<Glm> {
    common::model_with(cfg, seed, &DenseFactory)
}

fn tok() -> Result<Tokenizer> {
    Ok(Tokenizer::default_glm()?)
}

/// max |a - b| <= 1e-4 * max |b|.
fn assert_close(a: &[f32], b: &[f32], what: &str) -> Result<()> {
    ensure!(a.len() == b.len(), "{what}: {} vs {} logits", a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    ensure!(diff <= 1e-4 * scale, "{what}: logits differ by {diff} (scale {scale})");
    Ok(())
}

#[test]
fn cached_decoding_matches_recomputing_the_row() -> Result<()> {
    let tok = tok()?;
    let s = tok.specials();
    let (gmask, mask, sop) = (s.gmask.unwrap(), s.mask.unwrap(), s.sop.unwrap());
    let text = tok.encode("The quick brown fox jumps over the lazy dog.");
    for cfg in configs() {
        let m = model(&cfg, 11)?;
        let gmask_ctx: Vec<u32> = text.iter().copied().chain([gmask]).collect();
        let mut mask_ctx = text.clone();
        mask_ctx.insert(3, mask);
        for (ctx, blank) in [(gmask_ctx, Blank::Gmask), (mask_ctx, Blank::Mask { at: 3 })] {
            let mut dec = Decoder::new(&m, &ctx, blank)?;
            let mut logits = dec.feed(&[sop])?;
            for step in 0..10 {
                let what = format!("{} {blank:?} step {step}", cfg.name);
                assert_close(&logits, &dec.recompute()?, &what)?;
                // Feed varied tokens (greedy on a random model tends to repeat one).
                let next = (argmax(&logits).unwrap() as u32 + 97 * step) % 8000;
                logits = dec.feed(&[next])?;
            }
            ensure!(dec.tokens().len() == ctx.len() + 11);
        }
    }
    Ok(())
}

/// Logits of a training sample's full forward (its positions and prefix layout).
fn sample_logits(m: &Glm, s: &Sample) -> Result<Tensor> {
    let n = s.tokens.len();
    let ids = Tensor::new(s.tokens.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let pos = match &s.block_positions {
        None => Tensor::new(s.positions.as_slice(), &Device::Cpu)?.unsqueeze(0)?,
        Some(b) => Tensor::new([s.positions.clone(), b.clone()].concat(), &Device::Cpu)?.reshape((1, 2, n))?,
    };
    Ok(m.forward(&ids, &pos, &AttnLayout::prefix_lm(&[s.prefix]), None)?.get(0)?)
}

/// Generation lays rows out as glm-data's objective lays out training samples: feeding a sample's
/// <sop> block through the decoder gives the logits of the sample's own forward.
#[test]
fn decoder_uses_the_training_layout() -> Result<()> {
    let tok = tok()?;
    let s = tok.specials();
    let ids = ObjectiveIds {
        mask: s.mask.unwrap(),
        gmask: s.gmask.unwrap(),
        sop: s.sop.unwrap(),
        eop: s.eop.unwrap(),
        pad: tok.unk_id(),
    };
    let text = tok.encode("Once upon a time there was a small village by the sea, where fishermen sang.");
    for (cfg, kind) in configs().into_iter().zip([PositionKind::OneD, PositionKind::TwoD]) {
        let m = model(&cfg, 5)?;
        // [gMASK]: context [gMASK] <sop> target <eop>.
        let g = objective::prefix_lm_sample(&text[..8], &text[8..], Mode::Gmask, kind, &ids);
        // [MASK]: Part A, then the first span's block (it sees only Part A and itself).
        let ocfg = ObjectiveConfig { positions: kind, mask_ratio: 0.3, ..ObjectiveConfig::default() };
        let mk = objective::mask_sample(&text, &ocfg, &ids, &mut rand_chacha::ChaCha8Rng::seed_from_u64(3));
        let at = mk.positions[mk.prefix] as usize; // the first block's [MASK]
        ensure!(mk.tokens[at] == ids.mask);
        for (sample, blank) in [(&g, Blank::Gmask), (&mk, Blank::Mask { at })] {
            let p = sample.prefix;
            // The first block: <sop> and its span, up to the next <sop> or the end.
            let block_len = 1 + sample.tokens[p + 1..].iter().take_while(|&&t| t != ids.sop).count();
            ensure!(block_len > 1);
            let full = sample_logits(&m, sample)?;
            let mut dec = Decoder::new(&m, &sample.tokens[..p], blank)?;
            for i in p..p + block_len {
                let got = dec.feed(&sample.tokens[i..i + 1])?;
                let want: Vec<f32> = full.get(i)?.to_vec1()?;
                assert_close(&got, &want, &format!("{} {blank:?} token {i}", cfg.name))?;
            }
        }
    }
    Ok(())
}

#[test]
fn a_feed_spread_over_steps_a_layer_at_a_time_gives_the_logits_of_one_feed() -> Result<()> {
    let tok = tok()?;
    let s = tok.specials();
    let (gmask, sop) = (s.gmask.unwrap(), s.sop.unwrap());
    let ctx: Vec<u32> =
        tok.encode("A context long enough to be worth spreading over steps.").into_iter().chain([gmask]).collect();
    for cfg in configs() {
        let m = model(&cfg, 13)?;
        let mut whole = Decoder::new(&m, &ctx, Blank::Gmask)?;
        let mut spread = Decoder::new(&m, &ctx, Blank::Gmask)?;
        let want = whole.feed(&[sop])?;
        spread.begin_feed(&[sop])?;
        ensure!(spread.feed_layers_left() == cfg.num_layers);
        // A row in the middle of a feed can be neither fed, forked nor batched.
        ensure!(spread.begin_feed(&[sop]).is_err() && spread.fork().is_err());
        let mut steps = 0;
        let got = loop {
            steps += 1;
            if let Some(l) = spread.continue_feed(1)? {
                break l;
            }
            ensure!(Decoder::feed_batch(&mut [&mut spread], &[5]).is_err(), "batched mid-feed");
        };
        ensure!(steps == cfg.num_layers && spread.feed_layers_left() == 0, "{}: {steps} steps", cfg.name);
        ensure!(got == want, "{}: spread over layers, the logits differ", cfg.name);
        ensure!(spread.continue_feed(1).is_err(), "no feed under way");
        // And the rows go on alike.
        let (a, b) = (whole.feed(&[7])?, spread.feed(&[7])?);
        ensure!(a == b, "{}: the next token's logits differ", cfg.name);
    }
    Ok(())
}

#[test]
fn greedy_is_deterministic_and_the_argmax_of_recomputed_logits() -> Result<()> {
    let tok = tok()?;
    let s = tok.specials();
    for cfg in configs() {
        let m = model(&cfg, 21)?;
        let gen = Generator::new(&m, &tok)?;
        let prompt = "In the beginning";
        let a = gen.complete(prompt, &SamplingConfig::greedy(12))?;
        let b = gen.complete(prompt, &SamplingConfig::greedy(12))?;
        ensure!(a == b, "greedy differs between runs");
        ensure!(a.text.starts_with(prompt) && a.text == format!("{prompt}{}", a.spans[0].text));
        // Replay without the cache.
        let ctx: Vec<u32> = tok.encode(prompt).into_iter().chain(s.gmask).collect();
        let mut dec = Decoder::new(&m, &ctx, Blank::Gmask)?;
        dec.feed(&[s.sop.unwrap()])?;
        // The layout's own tokens are never sampled.
        let valid_argmax = |mut l: Vec<f32>| {
            [s.mask, s.gmask, s.smask, s.sop].into_iter().flatten().for_each(|i| l[i as usize] = f32::NEG_INFINITY);
            argmax(&l).map(|i| i as u32)
        };
        for &t in &a.tokens {
            ensure!(valid_argmax(dec.recompute()?) == Some(t), "{}: greedy token {t} is not the argmax", cfg.name);
            dec.feed(&[t])?;
        }
        let last = valid_argmax(dec.recompute()?);
        match a.stop {
            StopReason::Eop => ensure!(last == s.eop),
            StopReason::Eod => ensure!(last == s.eod),
            StopReason::MaxNewTokens => ensure!(a.tokens.len() == 12),
            StopReason::MaxSeqLen | StopReason::StopString => anyhow::bail!("{:?} cannot happen here", a.stop),
        }
    }
    Ok(())
}

#[test]
fn seeded_sampling_is_reproducible_and_top_k_1_is_greedy() -> Result<()> {
    let tok = tok()?;
    let m = model(&Config::tiny(), 2)?;
    let gen = Generator::new(&m, &tok)?;
    let cfg = SamplingConfig { temperature: 1.0, top_k: 0, top_p: 0.9, seed: 7, max_new_tokens: 10, min_new_tokens: 0 };
    let a = gen.complete("Hello world", &cfg)?;
    ensure!(a == gen.complete("Hello world", &cfg)?, "same seed, different samples");
    let c = gen.complete("Hello world", &SamplingConfig { seed: 8, ..cfg })?;
    ensure!(a.tokens != c.tokens, "another seed gave the same {} tokens", a.tokens.len());
    let k1 = SamplingConfig { temperature: 0.8, top_k: 1, top_p: 0.9, seed: 99, max_new_tokens: 10, min_new_tokens: 0 };
    ensure!(gen.complete("Hello world", &k1)? == gen.complete("Hello world", &SamplingConfig::greedy(10))?);
    Ok(())
}

#[test]
fn fill_replaces_each_mask_and_keeps_the_text_around_it() -> Result<()> {
    let tok = tok()?;
    for cfg in configs() {
        let m = model(&cfg, 4)?;
        let gen = Generator::new(&m, &tok)?;
        let out = gen.fill("The cat [MASK] on the mat.", &SamplingConfig::greedy(5))?;
        ensure!(out.spans.len() == 1 && !out.spans[0].tokens.is_empty());
        ensure!(out.text == format!("The cat {} on the mat.", out.spans[0].text), "{:?}", out.text);

        let sampled = SamplingConfig { seed: 5, max_new_tokens: 4, ..SamplingConfig::default() };
        let out = gen.fill("[MASK] one, [sMASK] two [MASK]", &sampled)?;
        ensure!(out.spans.len() == 3);
        let sp: Vec<&str> = out.spans.iter().map(|s| s.text.as_str()).collect();
        ensure!(out.text == format!("{} one, {} two {}", sp[0], sp[1], sp[2]), "{:?}", out.text);
        ensure!(out.tokens.len() == out.spans.iter().map(|s| s.tokens.len()).sum::<usize>());
        let sp = tok.specials();
        let layout_tokens: Vec<u32> = [sp.mask, sp.gmask, sp.smask, sp.sop].into_iter().flatten().collect();
        ensure!(out.tokens.iter().all(|t| !layout_tokens.contains(t)), "a layout token was sampled");
    }
    Ok(())
}

#[test]
fn long_generation_stops_at_max_seq_len() -> Result<()> {
    let tok = tok()?;
    let cfg = Config { max_seq_len: 20, ..Config::tiny() };
    let m = model(&cfg, 1)?;
    let gen = Generator::new(&m, &tok)?;
    let ctx = tok.encode("a b c d e").len() + 1;
    let out = gen.complete("a b c d e", &SamplingConfig::greedy(1000))?;
    if out.stop == StopReason::MaxSeqLen {
        // The row (context, <sop>, all but the last token) is exactly full.
        ensure!(ctx + 1 + out.tokens.len() - 1 == 20, "{} tokens after {ctx}", out.tokens.len());
    } else {
        ensure!(matches!(out.stop, StopReason::Eop | StopReason::Eod));
    }
    Ok(())
}

#[test]
fn bad_input_gives_clear_errors() -> Result<()> {
    let tok = tok()?;
    let small = Config { max_seq_len: 16, ..Config::tiny() };
    let m = model(&small, 1)?;
    let gen = Generator::new(&m, &tok)?;
    let g = SamplingConfig::greedy(4);

    let long = "word ".repeat(40);
    let e = gen.complete(&long, &g).unwrap_err();
    ensure!(matches!(e, Error::TooLong { max: 16, .. }) && e.to_string().contains("max_seq_len 16"), "{e}");
    ensure!(matches!(gen.fill(&format!("{long}[MASK]"), &g), Err(Error::TooLong { .. })));
    ensure!(matches!(gen.complete("", &g), Err(Error::EmptyPrompt)));
    ensure!(matches!(gen.fill("", &g), Err(Error::EmptyPrompt)));
    let e = gen.fill("no blank here", &g).unwrap_err();
    ensure!(matches!(e, Error::NoMask(_)) && e.to_string().contains("no blank here"), "{e}");
    let e = gen.complete("hi", &SamplingConfig { temperature: -1.0, ..g }).unwrap_err();
    ensure!(e.to_string().contains("temperature"), "{e}");
    ensure!(matches!(Decoder::new(&m, &[5, 6], Blank::Mask { at: 2 }), Err(Error::Input(_))));

    // Tokenizers without the special ids a mode needs.
    let json = glm_tokenizer::DEFAULT_TOKENIZER_JSON;
    let no_sop = Tokenizer::from_json_str(&json.replace("<sop>", "<s0p>"), "no sop")?;
    let e = Generator::new(&m, &no_sop).err().unwrap();
    ensure!(e.to_string().contains("no <sop> token"), "{e}");
    let no_mask = Tokenizer::from_json_str(&json.replace("[MASK]", "[M4SK]").replace("[sMASK]", "[sM4SK]"), "x")?;
    let gen2 = Generator::new(&m, &no_mask)?;
    let e = gen2.fill("a [MASK] b", &g).unwrap_err();
    ensure!(matches!(e, Error::MissingToken { token: "[MASK]", needed_by: "fill" }), "{e}");
    gen2.complete("a b", &g)?;

    // Special ids beyond the model's vocabulary.
    let narrow = Config { vocab_size: 4096, special_tokens: glm_model::SpecialTokens::from(4000), ..Config::tiny() };
    let m = model(&narrow, 1)?;
    let e = Generator::new(&m, &tok).err().unwrap();
    ensure!(matches!(e, Error::TokenOutsideVocab { vocab: 4096, .. }), "{e}");
    Ok(())
}

#[test]
fn min_new_tokens_bans_the_end_tokens_until_reached() -> Result<()> {
    let tok = tok()?;
    let m = model(&Config::tiny(), 3)?;
    let gen = Generator::new(&m, &tok)?;
    let s = tok.specials();
    for seed in 0..6 {
        // temperature 3 flattens the distribution, so end tokens are real candidates.
        let cfg = SamplingConfig { temperature: 3.0, top_k: 0, top_p: 0.0, seed, max_new_tokens: 9, min_new_tokens: 9 };
        let out = gen.complete("Hello", &cfg)?;
        ensure!(out.tokens.len() == 9 && out.stop == StopReason::MaxNewTokens, "{:?}", out.stop);
        ensure!(out.tokens.iter().all(|t| Some(*t) != s.eop && Some(*t) != s.eod));
    }
    Ok(())
}

#[test]
fn one_beam_is_greedy_and_beam_search_is_deterministic() -> Result<()> {
    let tok = tok()?;
    let m = model(&Config::tiny(), 6)?;
    let gen = Generator::new(&m, &tok)?;
    let one = glm_infer::BeamConfig {
        num_beams: 1,
        length_penalty: 0.0,
        no_repeat_ngram: 0,
        max_new_tokens: 8,
        ..Default::default()
    };
    let beam = gen.complete_beam("Hello world", &one)?;
    let greedy = gen.complete("Hello world", &SamplingConfig::greedy(8))?;
    ensure!(beam.tokens == greedy.tokens, "{:?} vs {:?}", beam.tokens, greedy.tokens);
    let four = glm_infer::BeamConfig { num_beams: 4, max_new_tokens: 8, ..Default::default() };
    let a = gen.complete_beam("Hello world", &four)?;
    ensure!(a == gen.complete_beam("Hello world", &four)?);
    ensure!(a.text.starts_with("Hello world"));
    // Blank filling by beam search: one beam is greedy filling, blank by blank; four beams keep
    // the text around each blank and are deterministic.
    let text = "The [MASK] sat on the [MASK].";
    let one = glm_infer::BeamConfig { min_new_tokens: 1, ..one };
    let beam = gen.fill_beam(text, &one)?;
    let greedy = gen.fill(text, &SamplingConfig { min_new_tokens: 1, ..SamplingConfig::greedy(8) })?;
    ensure!(beam.spans.len() == 2 && beam.tokens == greedy.tokens, "{:?} vs {:?}", beam.tokens, greedy.tokens);
    let four = glm_infer::BeamConfig { min_new_tokens: 1, ..four };
    let b = gen.fill_beam(text, &four)?;
    ensure!(b == gen.fill_beam(text, &four)?);
    ensure!(b.text.starts_with("The ") && b.text.ends_with('.') && b.spans.iter().all(|s| !s.tokens.is_empty()));
    Ok(())
}

#[test]
fn streaming_releases_whole_characters_and_stops_at_stop_strings() -> Result<()> {
    let tok = tok()?;
    // Byte-fallback pieces of one emoji: nothing is released until the character is complete.
    let ids = tok.encode("😀");
    let mut s = glm_infer::TextStream::new(&tok, &tok.encode("Hi"))?;
    let mut shown = String::new();
    for i in 1..=ids.len() {
        let (delta, stop) = s.push(&ids[..i], &[], false)?;
        ensure!(!stop && !delta.contains('\u{FFFD}'), "{delta:?}");
        shown += &delta;
    }
    ensure!(shown.trim_start() == "😀", "{shown:?}");

    let m = model(&Config::tiny(), 2)?;
    let gen = Generator::new(&m, &tok)?;
    let cfg = SamplingConfig::greedy(16);
    let full = gen.complete("Hello world", &cfg)?;
    let mut pieces = Vec::new();
    let streamed = gen.complete_stream("Hello world", &cfg, &[], &mut |t| pieces.push(t.to_string()))?;
    ensure!(
        streamed.text == full.text && pieces.concat() == full.spans[0].text,
        "{pieces:?} vs {:?}",
        full.spans[0].text
    );
    // A stop string taken from the middle of that output cuts the text right before it.
    let body = full.spans[0].text.clone();
    let chars: Vec<char> = body.chars().collect();
    if chars.len() >= 4 {
        let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
        let mut seen = String::new();
        let cut = gen.complete_stream("Hello world", &cfg, std::slice::from_ref(&stop), &mut |t| seen.push_str(t))?;
        let want = &body[..body.find(&stop).unwrap_or(body.len())];
        ensure!(cut.spans[0].text == want && seen == want, "{:?} vs {want:?}", cut.spans[0].text);
        ensure!(cut.stop == StopReason::StopString);
    }
    Ok(())
}

#[test]
fn chat_templates_write_each_model_s_own_format() {
    use glm_infer::ChatTemplate;
    let one = [("user", "你好")];
    assert_eq!(ChatTemplate::Glm.prompt(one), "问：你好\n答：");
    // ChatGLM-6B's chat(): a lone question as it is, history as [Round i] turns.
    assert_eq!(ChatTemplate::ChatGlm.prompt(one), "你好");
    let conv = [("user", "你好"), ("assistant", "你好！有什么可以帮你？"), ("user", " 讲个笑话 ")];
    assert_eq!(
        ChatTemplate::ChatGlm.prompt(conv),
        "[Round 0]\n问：你好\n答：你好！有什么可以帮你？\n[Round 1]\n问：讲个笑话\n答："
    );
    assert_eq!(ChatTemplate::Glm.prompt(conv), "问：你好\n答：你好！有什么可以帮你？\n问：讲个笑话\n答：");
    // System text first; a conversation ending with an answer continues it.
    let sys = [("system", "Be brief."), ("user", "Hi")];
    assert_eq!(ChatTemplate::ChatGlm.prompt(sys), "Be brief.\nHi");
    assert_eq!(ChatTemplate::ChatGlm.prompt([("user", "Hi"), ("assistant", "Hel")]), "[Round 0]\n问：Hi\n答：Hel");
    let tok = glm_tokenizer::Tokenizer::default_glm().unwrap();
    assert_eq!(ChatTemplate::for_tokenizer(&tok), ChatTemplate::Glm);
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/chatglm-tokenizer/v1.1");
    let tok = glm_tokenizer::Tokenizer::from_chatglm_dir(&dir).unwrap();
    assert_eq!(ChatTemplate::for_tokenizer(&tok), ChatTemplate::ChatGlm);
}
