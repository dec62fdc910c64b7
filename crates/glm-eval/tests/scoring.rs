//! Scoring on a real (random, seeded) `tiny` model: the batched block-diagonal multiple-choice
//! path against one choice per row, answers the model must pick, and whole tasks run from YAML.

use anyhow::{ensure, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use glm_eval::{evaluate, EvalOptions, Scorer, TaskConfig};
use glm_model::{init_weights, Config, Glm};

fn model(seed: u64) -> Result<Glm> {
    let cfg = Config::tiny();
    let dev = Device::Cpu;
    let w = init_weights(&cfg, seed, &dev)?;
    Ok(Glm::new(&cfg, VarBuilder::from_tensors(w, DType::F32, &dev), &glm_nn::DenseFactory)?)
}

#[test]
fn batched_block_diagonal_choices_equal_one_choice_per_row() -> Result<()> {
    let (tok, _) = glm_data::load_tokenizer(None)?;
    let m = model(3)?;
    let s = Scorer::new(&m, &tok, 2048)?;
    let mut items = Vec::new();
    for (text, gmask, choices) in [
        ("The capital of France is", false, vec!["Paris", "London and Rome", "a small town by the sea"]),
        ("今天天气很好，我们去", true, vec!["公园", "学校上课", "海边"]),
        ("Answer: (", false, vec!["A", "B", "C", "D"]),
    ] {
        let choices = s.encode_choices(&choices.iter().map(|c| c.to_string()).collect::<Vec<_>>())?;
        let (context, blank) = s.context(text, gmask, Scorer::choice_tokens(&choices))?;
        items.push((context, blank, choices));
    }
    // Three examples of different lengths in one padded batch, every choice block in one row.
    let batched = s.choice_logprobs(&items)?;
    for ((context, blank, choices), got) in items.iter().zip(&batched) {
        let single = s.choice_logprobs_single(context, *blank, choices)?;
        for (a, b) in got.iter().zip(&single) {
            ensure!((a - b).abs() < 1e-3 * b.abs().max(1.0), "batched {a} vs single {b}");
            ensure!(a.is_finite() && *a < 0.0);
        }
    }
    // Single-token choices share one <sop>: the model's own most likely next token wins.
    let (context, blank, _) = &items[2];
    let all: Vec<Vec<u32>> = (5..200u32).map(|t| vec![t]).collect();
    let scores = s.choice_logprobs(&[(context.clone(), *blank, all.clone())])?.remove(0);
    let best = scores.iter().enumerate().fold((0, f64::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b });
    let total: f64 = scores.iter().map(|v| v.exp()).sum();
    ensure!(total <= 1.0 + 1e-6, "probabilities of distinct next tokens sum to {total}");
    let single = s.choice_logprobs_single(context, *blank, &all[best.0..best.0 + 1])?;
    ensure!((single[0] - best.1).abs() < 1e-3);
    Ok(())
}

#[test]
fn left_truncation_keeps_the_end_and_the_blank() -> Result<()> {
    let (tok, _) = glm_data::load_tokenizer(None)?;
    let m = model(3)?;
    let s = Scorer::new(&m, &tok, 16)?;
    let (ctx, _) = s.context(&"word ".repeat(100), false, 4)?;
    ensure!(ctx.len() == 12, "{}", ctx.len()); // 16 - 4 reserved
    ensure!(Some(*ctx.last().unwrap_or(&0)) == tok.specials().mask);
    ensure!(s.context("x", false, 16).is_err());
    Ok(())
}

#[test]
fn tasks_run_from_yaml_and_score_what_the_model_prefers() -> Result<()> {
    let (tok, _) = glm_data::load_tokenizer(None)?;
    let m = model(5)?;
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    std::fs::create_dir_all(root.join("mc/g1"))?;
    std::fs::create_dir_all(root.join("lm"))?;
    // Labels set to the model's own preference, then to another choice: accuracy 100% and 0%.
    let s = Scorer::new(&m, &tok, 2048)?;
    let questions = ["One plus one is", "The sky is", "Water is", "猫是"];
    let choices = ["red", "blue", "green"];
    let (mut right, mut wrong) = (String::new(), String::new());
    for q in questions {
        let enc = s.encode_choices(&choices.iter().map(|c| c.to_string()).collect::<Vec<_>>())?;
        let (ctx, blank) = s.context(q, false, Scorer::choice_tokens(&enc))?;
        let sc = s.choice_logprobs(&[(ctx, blank, enc)])?.remove(0);
        let best = (0..3).fold(0, |b, i| if sc[i] > sc[b] { i } else { b });
        let line = |l: usize| {
            serde_json::json!({"inputs_pretokenized": q, "choices_pretokenized": choices, "label": l}).to_string()
        };
        right += &(line(best) + "\n");
        wrong += &(line((best + 1) % 3) + "\n");
    }
    std::fs::write(root.join("mc/g1/right.jsonl"), right)?;
    std::fs::write(root.join("mc/g1/wrong.jsonl"), wrong)?;
    std::fs::write(root.join("lm/en.jsonl"), "{\"text\": \"The river runs to the sea. The sea is wide.\"}\n")?;
    let yaml = |s: &str| -> Result<TaskConfig> { Ok(TaskConfig::parse(s, &root.join("t.yaml"))?) };
    let opts = EvalOptions {
        data_root: root.to_path_buf(),
        limit: None,
        batch: Some(3),
        progress: false,
        one_choice_per_row: false,
    };
    let mc = yaml("name: mc\ntype: mul\npath: mc\nfile-pattern:\n  right: \"g1/right.jsonl\"\n  wrong: \"g1/wrong.jsonl\"\nmicro-batch-size: 2\n")?;
    let scores = evaluate(&m, &tok, &mc, &opts)?;
    let acc: Vec<f64> = scores.iter().map(|f| f.sums["correct"] / f.examples as f64).collect();
    ensure!(acc == vec![1.0, 0.0], "{scores:?}");
    let reference = evaluate(&m, &tok, &mc, &EvalOptions { one_choice_per_row: true, ..opts.clone() })?;
    ensure!(reference == scores, "{reference:?}");
    let (tasks, groups, _) = glm_eval::report::task_rows(&mc, &scores);
    ensure!(tasks[0].value == 0.5 && groups.len() == 2);
    let lm = yaml("name: lm\ntype: lm\npath: lm\nfile-pattern: \"*.jsonl\"\ngeneration-length: 4\n")?;
    let scores = evaluate(&m, &tok, &lm, &opts)?;
    let (rows, _, _) = glm_eval::report::task_rows(&lm, &scores);
    let bpb = rows.iter().find(|r| r.metric == "BPB").map(|r| r.value).unwrap_or(0.0);
    // A random model: about log2(vocab) bits per token spread over the bytes of each token.
    ensure!(bpb > 1.0 && bpb < 20.0, "{rows:?}");
    // Windows of 4 and of 64 scored tokens see different contexts but score every token once.
    let total =
        |len: usize| -> Result<usize> { Ok(s.lm_loss("The river runs to the sea. The sea is wide.", len, 2)?.1) };
    ensure!(total(4)? == total(64)?);
    let gen = yaml("name: g\ntype: gen\npath: mc\nfile-pattern: \"g1/right.jsonl\"\nmax_gen_length: 3\n")?;
    ensure!(evaluate(&m, &tok, &gen, &opts).is_err(), "generation needs targets");
    // Generation: targets set to the model's own greedy fill are matched exactly, others are not.
    std::fs::create_dir_all(root.join("gen"))?;
    let g = glm_infer::Generator::new(&m, &tok)?;
    let cfg = glm_infer::SamplingConfig { min_new_tokens: 2, ..glm_infer::SamplingConfig::greedy(3) };
    let mut lines = String::new();
    for q in questions {
        let (ctx, blank) = s.context(q, false, 4)?;
        let (toks, _) = g.generate(&ctx, blank, &mut glm_infer::Sampler::new(&cfg)?)?;
        let own = tok.decode(&toks)?;
        lines +=
            &(serde_json::json!({"inputs_pretokenized": q, "targets_pretokenized": [own, "zzz"]}).to_string() + "\n");
        lines += &(serde_json::json!({"inputs_pretokenized": q, "targets_pretokenized": "zzz qqq"}).to_string() + "\n");
    }
    std::fs::write(root.join("gen/g.jsonl"), lines)?;
    let gen = yaml("name: g\ntype: gen\npath: gen\nmin_gen_length: 2\nmax_gen_length: 3\n")?;
    let scores = evaluate(&m, &tok, &gen, &opts)?;
    ensure!(scores[0].sums["em"] == 4.0 && scores[0].sums["f1"] == 4.0, "{scores:?}");
    Ok(())
}
