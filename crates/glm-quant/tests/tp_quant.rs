//! A quantized checkpoint opened for one tensor-parallel rank (`QuantCheckpoint::open_rank`) holds
//! exactly that rank's slices of the one-process tensors, and nothing of the other ranks'; cuts
//! that do not divide the model, or that would split an INT4 byte, are refused by name.

use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device};
use glm_dist::split::{shard, split_of, Split};
use glm_dist::{Group, LocalComm};
use glm_model::{init_weights, Config};
use glm_quant::{quantize_tensors, Bits, QuantCheckpoint};

fn write(cfg: &Config, bits: Bits, path: &Path) -> Result<()> {
    let w = init_weights(cfg, 3, &Device::Cpu)?;
    let load = |name: &str| w.get(name).cloned().ok_or_else(|| format!("no tensor {name}"));
    quantize_tensors(cfg, load, bits, path)?;
    Ok(())
}

#[test]
fn a_rank_reads_exactly_its_slices() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = Config::tiny();
    for bits in [Bits::Int8, Bits::Int4] {
        let path = dir.path().join(format!("int{}.safetensors", bits.bits()));
        write(&cfg, bits, &path)?;
        let whole = QuantCheckpoint::open(&path)?;
        for tp in [2, 4] {
            let ranks = (0..tp).map(|k| QuantCheckpoint::open_rank(&path, tp, k)).collect::<Result<Vec<_>, _>>()?;
            for (k, r) in ranks.iter().enumerate() {
                let what = format!("INT{} tp {tp} rank {k}", bits.bits());
                ensure!(r.shard() == (k, tp), "{what}: shard {:?}", r.shard());
                ensure!(r.quantized().len() == whole.quantized().len(), "{what}: a quantized weight is missing");
                for (name, m) in whole.quantized() {
                    let got = r.quantized().get(name).with_context(|| format!("{what}: no {name}"))?;
                    let split = split_of(&cfg, name);
                    ensure!(split != Split::Replicated, "{name}: a block linear must be split");
                    ensure!(**got == m.shard(split, tp, k)?, "{what}: {name} is not the exact slice of the whole");
                }
                for (name, t) in whole.dense() {
                    let got = r.dense().get(name).with_context(|| format!("{what}: no {name}"))?;
                    let want = shard(t, split_of(&cfg, name), tp, k)?;
                    ensure!(got.dims() == want.dims() && got.dtype() == want.dtype(), "{what}: {name}'s shape");
                    let d = (got.to_dtype(DType::F32)? - want.to_dtype(DType::F32)?)?.abs()?.max_all()?;
                    ensure!(d.to_scalar::<f32>()? == 0.0, "{what}: {name} differs from the whole's slice");
                }
                // Only its own slices in memory: the packed bytes are a tp-th of the whole's.
                let bytes = |q: &QuantCheckpoint| q.quantized().values().map(|m| m.data.len()).sum::<usize>();
                ensure!(bytes(r) * tp == bytes(&whole), "{what}: holds {} packed bytes of {}", bytes(r), bytes(&whole));
                let e = r.model(DType::F32, &Device::Cpu).err().map(|e| e.to_string()).unwrap_or_default();
                ensure!(e.contains("model_tp"), "{what}: model() on a rank's slices: {e}");
            }
        }
    }
    // A model built for another rank than the one opened is refused.
    let path = dir.path().join("int8.safetensors");
    let errs = LocalComm::run(2, Duration::from_secs(30), |comm| {
        let g = Group::register(Rc::clone(&comm));
        let q = QuantCheckpoint::open_rank(&path, 2, 1 - g.rank()).map_err(|e| glm_dist::Error::Comm(e.to_string()))?;
        Ok(q.model_tp(DType::F32, &Device::Cpu, g).err().map(|e| e.to_string()).unwrap_or_default())
    })?;
    for e in errs {
        ensure!(e.contains("opened for tensor-parallel rank"), "{e}");
    }
    Ok(())
}

#[test]
fn bad_cuts_are_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // 4 heads cannot be cut 3 ways.
    let path = dir.path().join("tiny.safetensors");
    write(&Config::tiny(), Bits::Int8, &path)?;
    let e = QuantCheckpoint::open_rank(&path, 3, 0).err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(e.contains("cannot be split 3 ways") && e.contains("4 heads"), "{e}");
    let e = QuantCheckpoint::open_rank(&path, 2, 2).err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(e.contains("rank 2 of a tensor-parallel degree of 2"), "{e}");
    // FFN 388 at TP 4: 97 input columns of dense_4h_to_h per rank, an odd count: INT4 would split a
    // packed byte. INT8 cuts it.
    let cfg = Config { ffn_hidden_size: 388, ..Config::tiny() };
    let path = dir.path().join("odd-int4.safetensors");
    write(&cfg, Bits::Int4, &path)?;
    let e = QuantCheckpoint::open_rank(&path, 4, 1).err().map(|e| e.to_string()).unwrap_or_default();
    for key in ["dense_4h_to_h.weight", "rank 1 of 4", "INT4", "each rank 97", "split a packed byte"] {
        ensure!(e.contains(key), "the error does not mention {key:?}: {e}");
    }
    ensure!(QuantCheckpoint::open_rank(&path, 2, 1).is_ok(), "TP 2 leaves 194 columns per rank: fine");
    let path = dir.path().join("odd-int8.safetensors");
    write(&cfg, Bits::Int8, &path)?;
    ensure!(QuantCheckpoint::open_rank(&path, 4, 1).is_ok(), "INT8 has no column pairs");
    Ok(())
}
