//! The pretraining objective: statistics over 10,000 rows and per-sample invariants.

use std::sync::Arc;

use glm_data::batch::Row;
use glm_data::objective::{self, Mode, ObjectiveConfig, ObjectiveIds, PositionKind, IGNORE};
use glm_data::shard::{Shard, ShardHeader};
use glm_data::{stats, Batcher, Instructions, TokenStream};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const IDS: ObjectiveIds = ObjectiveIds { mask: 1000, gmask: 1001, sop: 1004, eop: 1005, pad: 3 };
const EOD: u32 = 1003;

fn header() -> ShardHeader {
    ShardHeader { tokenizer: "test".into(), vocab_size: 1100, index: 0, count: 1, created_by: "test".into() }
}

/// Random documents of text ids in 10..900 (never a special id).
fn stream(seed: u64, docs: usize) -> TokenStream {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let d: Vec<Vec<u32>> =
        (0..docs).map(|_| (0..rng.random_range(50..3000)).map(|_| rng.random_range(10..900)).collect()).collect();
    TokenStream::new(vec![Arc::new(Shard::from_docs(header(), &d))], EOD, seed, 0, 1).unwrap()
}

fn instructions(seed: u64) -> Instructions {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let ex = (0..500)
        .map(|_| {
            let p = (0..rng.random_range(5..150)).map(|_| rng.random_range(10..900)).collect();
            let t = (0..rng.random_range(1..60)).map(|_| rng.random_range(10..900)).collect();
            (p, t)
        })
        .collect();
    Instructions::new(ex, seed).unwrap()
}

fn batcher(cfg: ObjectiveConfig, seed: u64) -> Batcher {
    Batcher::new(cfg, IDS, stream(seed, 400), Some(instructions(seed)), seed, 0).unwrap()
}

#[test]
fn statistics_over_10000_rows_match_the_settings() {
    // GLM-130B's 2048-token rows, and the `tiny` preset's 512.
    for (share, seed, seq_len) in [(0.05, 1u64, 2048), (0.2, 2, 2048), (0.0, 3, 2048), (0.05, 4, 512)] {
        let cfg = ObjectiveConfig { mip_token_share: share, seq_len, ..ObjectiveConfig::default() };
        let s = stats::measure(&mut batcher(cfg, seed), 10_000);
        eprintln!("{s:?}");
        assert!((s.mask_fraction - 0.15).abs() <= 0.01, "mask fraction {}", s.mask_fraction);
        assert!((s.mean_span_length - 3.0).abs() <= 0.2, "mean span {}", s.mean_span_length);
        assert!((s.mask_mode_share - 0.3).abs() <= 0.02, "mask mode share {}", s.mask_mode_share);
        assert!((s.gmask_mode_share - 0.7).abs() <= 0.02, "gmask mode share {}", s.gmask_mode_share);
        assert!((s.mip_token_share - share).abs() <= 0.01, "mip token share {} for {share}", s.mip_token_share);
        // U[0.2, 1) suffixes: mean 0.6.
        assert!((s.mean_gmask_suffix_share - 0.6).abs() <= 0.02, "gmask suffix {}", s.mean_gmask_suffix_share);
    }
}

/// Every invariant of one row; returns the number of samples checked.
fn check_row(row: &Row, cfg: &ObjectiveConfig) -> usize {
    let t = cfg.seq_len;
    assert_eq!(row.tokens.len(), t);
    assert_eq!(row.targets.len(), t);
    assert_eq!(row.positions.len(), t);
    if let Some(b) = &row.block_positions {
        assert_eq!(b.len(), t);
    }
    // Segments tile the front of the row; the rest is padding without loss.
    let mut at = 0;
    for seg in &row.segments {
        assert_eq!(seg.start, at);
        assert!(seg.prefix >= 1 && seg.prefix < seg.len);
        at += seg.len;
    }
    assert!(at <= t);
    assert!(row.tokens[at..].iter().all(|&x| x == IDS.pad));
    assert!(row.targets[at..].iter().all(|&x| x == IGNORE));
    if row.mode != Mode::Mip {
        assert!(row.segments.len() == if row.mode == Mode::Mask { cfg.samples_per_row } else { 1 });
    }
    for seg in &row.segments {
        let toks = &row.tokens[seg.start..seg.start + seg.len];
        let tg = &row.targets[seg.start..seg.start + seg.len];
        let pos = &row.positions[seg.start..seg.start + seg.len];
        let (a, b) = (seg.prefix, seg.len);
        // Loss only on Part B, and on every Part B token.
        assert!(tg[..a].iter().all(|&x| x == IGNORE));
        assert!(tg[a..].iter().all(|&x| x != IGNORE));
        // Part A positions 0..|A|.
        assert!(pos[..a].iter().enumerate().all(|(i, &p)| p == i as u32));
        // Part B is a sequence of `<sop> body` blocks whose targets are `body <eop>`.
        let mut i = a;
        let mut blocks = 0;
        while i < b {
            assert_eq!(toks[i], IDS.sop, "block start");
            let mut j = i + 1;
            while j < b && toks[j] != IDS.sop {
                j += 1;
            }
            for k in i..j - 1 {
                assert_eq!(tg[k], toks[k + 1] as i64, "targets are the next block token");
            }
            assert_eq!(tg[j - 1], IDS.eop as i64);
            match row.mode {
                Mode::Mask => {
                    let p = pos[i];
                    assert!(pos[i..j].iter().all(|&x| x == p), "span tokens take their [MASK]'s position");
                    assert_eq!(toks[p as usize], IDS.mask, "the held position is a [MASK]");
                }
                _ => {
                    assert_eq!(toks[a - 1], IDS.gmask);
                    assert!(pos[i..j].iter().enumerate().all(|(k, &x)| x == (a + k) as u32), "positions continue");
                }
            }
            blocks += 1;
            i = j;
        }
        let masks = toks[..a].iter().filter(|&&x| x == IDS.mask).count();
        match row.mode {
            Mode::Mask => assert_eq!(masks, blocks, "one block per [MASK]"),
            _ => assert_eq!(blocks, 1),
        }
    }
    row.segments.len()
}

#[test]
fn every_sample_keeps_the_invariants() {
    for positions in [PositionKind::OneD, PositionKind::TwoD] {
        let cfg = ObjectiveConfig { seq_len: 512, positions, mip_token_share: 0.1, ..ObjectiveConfig::default() };
        let mut b = batcher(cfg.clone(), 7);
        let mut n = 0;
        for _ in 0..300 {
            let row = b.next_row();
            if positions == PositionKind::OneD {
                n += check_row(&row, &cfg);
            } else {
                // 2-D: first dim held at the [MASK]/[gMASK] index in Part B, second 1.. per block.
                let bp = row.block_positions.as_ref().unwrap();
                for seg in &row.segments {
                    let r = seg.start..seg.start + seg.len;
                    let (toks, pos, blk) = (&row.tokens[r.clone()], &row.positions[r.clone()], &bp[r]);
                    assert!(blk[..seg.prefix].iter().all(|&x| x == 0));
                    for i in seg.prefix..seg.len {
                        let held = toks[pos[i] as usize];
                        assert!(held == IDS.mask || held == IDS.gmask);
                        if toks[i] == IDS.sop {
                            assert_eq!(blk[i], 1);
                        } else {
                            assert_eq!(blk[i], blk[i - 1] + 1);
                        }
                    }
                }
                n += row.segments.len();
            }
        }
        assert!(n > 300);
    }
}

#[test]
fn masked_tokens_are_targets_exactly_once() {
    let cfg = ObjectiveConfig::default();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for _ in 0..500 {
        let text: Vec<u32> = (0..rng.random_range(20..600)).map(|_| rng.random_range(10..900)).collect();
        let s = objective::mask_sample(&text, &cfg, &IDS, &mut rng);
        // Rebuild the text: each [MASK] of Part A takes the body of its block in Part B.
        let mut bodies = std::collections::HashMap::new();
        let mut i = s.prefix;
        while i < s.len() {
            let p = s.positions[i] as usize;
            let mut j = i + 1;
            while j < s.len() && s.tokens[j] != IDS.sop {
                j += 1;
            }
            assert!(bodies.insert(p, s.tokens[i + 1..j].to_vec()).is_none(), "one block per [MASK]");
            i = j;
        }
        let mut rebuilt = Vec::new();
        for (k, &tok) in s.tokens[..s.prefix].iter().enumerate() {
            if tok == IDS.mask {
                let body = bodies.remove(&k).expect("a block for every [MASK]");
                assert!(!body.is_empty());
                rebuilt.extend(body);
            } else {
                rebuilt.push(tok);
            }
        }
        assert!(bodies.is_empty());
        assert_eq!(rebuilt, text);
        // Spans never touch: two [MASK]s are never adjacent.
        assert!(s.tokens[..s.prefix].windows(2).all(|w| !(w[0] == IDS.mask && w[1] == IDS.mask)));
        let targets = s.targets.iter().filter(|&&t| t != IGNORE && t != IDS.eop as i64).count();
        assert_eq!(targets, s.spans.iter().sum::<usize>());
    }
}

#[test]
fn packed_samples_do_not_attend_across_boundaries() {
    let cfg = ObjectiveConfig { seq_len: 256, mask_mode_prob: 1.0, mip_token_share: 0.0, ..ObjectiveConfig::default() };
    let mut b = Batcher::new(cfg, IDS, stream(5, 50), None, 5, 0).unwrap();
    let batch = b.next_batch(3);
    let (ids, pos, tg, layout) = batch.tensors(&candle_core::Device::Cpu).unwrap();
    assert_eq!(ids.dims(), &[3, 256]);
    assert_eq!(pos.dims(), &[3, 256]);
    assert_eq!(tg.dims(), &[3, 256]);
    for (r, row) in batch.rows.iter().enumerate() {
        assert_eq!(row.segments.len(), 4);
        for (x, sx) in row.segments.iter().enumerate() {
            for sy in row.segments.iter().skip(x + 1) {
                for i in [sx.start, sx.start + sx.len - 1] {
                    for j in [sy.start, sy.start + sy.len - 1] {
                        assert!(!layout.allowed(r, i, j) && !layout.allowed(r, j, i));
                    }
                }
            }
            // Within a sample: Part A bidirectional, Part B causal.
            let (a0, bl) = (sx.start, sx.start + sx.len - 1);
            assert!(layout.allowed(r, a0, sx.start + sx.prefix - 1));
            assert!(!layout.allowed(r, a0, bl));
            assert!(layout.allowed(r, bl, a0));
        }
    }
    assert_eq!(batch.loss_mask().len(), 3 * 256);
}

#[test]
fn cursor_restores_the_exact_sequence() {
    let cfg = ObjectiveConfig { seq_len: 256, mip_token_share: 0.1, ..ObjectiveConfig::default() };
    let mut a = batcher(cfg.clone(), 11);
    for _ in 0..37 {
        a.next_row();
    }
    let c = a.cursor();
    let json = serde_json::to_string(&c).unwrap();
    let want: Vec<Vec<u32>> = (0..50).map(|_| a.next_row().tokens).collect();
    let mut b = batcher(cfg, 11);
    b.restore(serde_json::from_str(&json).unwrap()).unwrap();
    let got: Vec<Vec<u32>> = (0..50).map(|_| b.next_row().tokens).collect();
    assert_eq!(got, want);
}

#[test]
fn data_parallel_ranks_read_disjoint_documents() {
    let d: Vec<Vec<u32>> = (0..40u32).map(|i| vec![i + 10; 5]).collect();
    let shard = Arc::new(Shard::from_docs(header(), &d));
    let mut seen = Vec::new();
    for rank in 0..4 {
        let mut s = TokenStream::new(vec![shard.clone()], EOD, 9, rank, 4).unwrap();
        let mut out = Vec::new();
        s.take(60, &mut out); // 10 documents of 5 tokens + eod each = one epoch for this rank
        let mut docs: Vec<u32> = out.iter().copied().filter(|&x| x != EOD).collect();
        docs.dedup();
        seen.extend(docs);
    }
    seen.sort();
    assert_eq!(seen, (10..50).collect::<Vec<u32>>());
    assert!(TokenStream::new(vec![shard], EOD, 9, 4, 4).is_err());
}

#[test]
fn bad_configs_are_refused() {
    let bad = [
        ObjectiveConfig { mask_ratio: 0.0, ..Default::default() },
        ObjectiveConfig { mask_mode_prob: 1.5, ..Default::default() },
        ObjectiveConfig { seq_len: 32, ..Default::default() },
    ];
    for cfg in bad {
        assert!(Batcher::new(cfg, IDS, stream(1, 20), Some(instructions(1)), 0, 0).is_err());
    }
    let err = Batcher::new(ObjectiveConfig::default(), IDS, stream(1, 20), None, 0, 0).err().unwrap();
    assert!(err.to_string().contains("no instruction data"), "{err}");
}

#[test]
fn pieces_shuffle_long_documents_and_keep_every_token_once() {
    // 6 documents of 40 distinct tokens: doc i holds 100 i + 0..40.
    let d: Vec<Vec<u32>> = (0..6u32).map(|i| (0..40).map(|j| 100 * (i + 1) + j).collect()).collect();
    let shard = Arc::new(Shard::from_docs(header(), &d));
    let mut s = TokenStream::new(vec![shard.clone()], EOD, 5, 0, 1).unwrap().with_max_piece(7);
    let mut out = Vec::new();
    s.take(6 * 41, &mut out); // one epoch: every token plus one eod per document
    assert_eq!(out.iter().filter(|&&t| t == EOD).count(), 6);
    let mut toks: Vec<u32> = out.iter().copied().filter(|&t| t != EOD).collect();
    // An eod follows only a document's last token.
    for w in out.windows(2) {
        if w[1] == EOD {
            assert_eq!(w[0] % 100, 39, "eod after {}", w[0]);
        }
    }
    // The first 7-token windows come from several documents, not one book in order.
    let docs: std::collections::HashSet<u32> = toks.iter().take(42).map(|t| t / 100).collect();
    assert!(docs.len() >= 3, "{docs:?}");
    toks.sort();
    assert_eq!(toks, d.concat());
    // The cursor restores mid-piece.
    let mut a = TokenStream::new(vec![shard.clone()], EOD, 5, 0, 1).unwrap().with_max_piece(7);
    let mut skip = Vec::new();
    a.take(31, &mut skip);
    let c = a.cursor();
    let (mut x, mut y) = (Vec::new(), Vec::new());
    a.take(50, &mut x);
    let mut b = TokenStream::new(vec![shard], EOD, 5, 0, 1).unwrap().with_max_piece(7);
    b.restore(c).unwrap();
    b.take(50, &mut y);
    assert_eq!(x, y);
}
