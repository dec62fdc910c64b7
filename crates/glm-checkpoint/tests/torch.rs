//! The torch.save reader against files torch itself wrote (fixtures/torch, made by
//! scripts/make_torch_fixtures.py), and the writer against the reader and, where a Python with
//! torch is installed, against torch.load.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use glm_checkpoint::torch::{save_tensors, TorchDtype, TorchEntry, TorchFile, TorchWriter};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/torch")
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("glm-torch-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The values of a tensor as f64, from its raw bytes.
fn values(dtype: TorchDtype, b: &[u8]) -> Vec<f64> {
    use half::{bf16, f16};
    match dtype {
        TorchDtype::F64 => b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect(),
        TorchDtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
        TorchDtype::F16 => b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f64()).collect(),
        TorchDtype::BF16 => b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f64()).collect(),
        TorchDtype::I64 => b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
        TorchDtype::I32 => b.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
        TorchDtype::I16 => b.chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]]) as f64).collect(),
        TorchDtype::I8 => b.iter().map(|&x| x as i8 as f64).collect(),
        TorchDtype::U8 | TorchDtype::Bool => b.iter().map(|&x| x as f64).collect(),
    }
}

fn dtype_name(d: TorchDtype) -> &'static str {
    match d {
        TorchDtype::F64 => "float64",
        TorchDtype::F32 => "float32",
        TorchDtype::F16 => "float16",
        TorchDtype::BF16 => "bfloat16",
        TorchDtype::I64 => "int64",
        TorchDtype::I32 => "int32",
        TorchDtype::I16 => "int16",
        TorchDtype::I8 => "int8",
        TorchDtype::U8 => "uint8",
        TorchDtype::Bool => "bool",
    }
}

fn check_against_expected(file: &str, key_path: &[&str]) {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap()).unwrap();
    let want = expected[file].as_object().unwrap();
    let f = TorchFile::open(&fixtures().join(file), key_path).unwrap();
    let names: Vec<&str> = f.names().collect();
    assert_eq!(names.len(), want.len(), "{file}: {names:?}");
    for (name, w) in want {
        let t = f.get(name).unwrap_or_else(|| panic!("{file}: no {name}"));
        assert_eq!(dtype_name(t.dtype), w["dtype"].as_str().unwrap(), "{name}");
        let shape: Vec<usize> = w["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(t.shape, shape, "{name}");
        let got = values(t.dtype, &f.read(name).unwrap());
        let want: Vec<f64> = w["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        // serde_json's float parsing may be off by an ulp from Python's repr.
        assert_eq!(got.len(), want.len(), "{file}: {name}");
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-12 * w.abs(), "{file}: {name}: {g} vs {w}");
        }
        // Rows one at a time give the same bytes as the whole tensor.
        if let Some(&rows) = t.shape.first() {
            let whole = f.read(name).unwrap();
            let by_row: Vec<u8> = (0..rows).flat_map(|r| f.read_rows(name, r, r + 1).unwrap()).collect();
            assert_eq!(by_row, whole, "{name} by rows");
        }
    }
}

#[test]
fn reads_what_torch_wrote() {
    check_against_expected("views.pt", &[]);
    check_against_expected("nested.pt", &["model", "language_model"]);
    check_against_expected("module.pt", &["module"]);
    // Strided views are gathered; the float path through candle agrees.
    let f = TorchFile::open(&fixtures().join("views.pt"), &[]).unwrap();
    assert!(!f.get("cols").unwrap().is_contiguous() && !f.get("transposed").unwrap().is_contiguous());
    let t = f.load("f16", DType::F32, &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[3, 2]);
}

#[test]
fn bad_files_are_clear_errors() {
    let e = TorchFile::open(&fixtures().join("legacy.pt"), &[]).unwrap_err().to_string();
    assert!(e.contains("legacy") && e.contains("legacy.pt"), "{e}");
    let e = TorchFile::open(&fixtures().join("nested.pt"), &["model", "encoder"]).unwrap_err().to_string();
    assert!(e.contains("model.encoder") && e.contains("language_model"), "{e}");
    let e = TorchFile::open(&fixtures().join("nested.pt"), &["iteration"]).unwrap_err().to_string();
    assert!(e.contains("not a dict"), "{e}");
    let e = TorchFile::open(&fixtures().join("nope.pt"), &[]).unwrap_err().to_string();
    assert!(e.contains("nope.pt"), "{e}");
    // Every truncation of a real file is an error naming it, before any tensor is read.
    let bytes = std::fs::read(fixtures().join("views.pt")).unwrap();
    let d = tmp("trunc");
    let p = d.join("cut.pt");
    for cut in (0..bytes.len()).step_by(7) {
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let e = TorchFile::open(&p, &[]).expect_err("a cut file must not open").to_string();
        assert!(e.contains("cut.pt"), "{e}");
    }
    // A storage record cut short inside the archive (sizes consistent, data too small).
    let f = TorchFile::open(&fixtures().join("views.pt"), &[]).unwrap();
    let e = f.read_rows("f32", 1, 3).unwrap_err().to_string();
    assert!(e.contains("rows 1..3 of 2"), "{e}");
    assert!(f.read("nope").unwrap_err().to_string().contains("nope"));
}

fn written(path: &Path) -> Vec<(String, TorchDtype, Vec<usize>)> {
    let f = TorchFile::open(path, &["module"]).unwrap();
    f.names().map(|n| (n.to_string(), f.get(n).unwrap().dtype, f.get(n).unwrap().shape.clone())).collect()
}

#[test]
fn writer_roundtrips_and_is_atomic() {
    let d = tmp("write");
    let p = d.join("mp_rank_00_model_states.pt");
    let entries = vec![
        TorchEntry { name: "w".into(), dtype: TorchDtype::F16, shape: vec![2, 3] },
        TorchEntry { name: "q".into(), dtype: TorchDtype::I8, shape: vec![4] },
        TorchEntry { name: "e".into(), dtype: TorchDtype::F32, shape: vec![0, 5] },
        TorchEntry { name: "s".into(), dtype: TorchDtype::F32, shape: vec![] },
    ];
    let mut w = TorchWriter::create(&p, "mp_rank_00_model_states", &["module"], entries.clone()).unwrap();
    w.write(&[1, 2, 3, 4, 5, 6]).unwrap(); // the f16 tensor in two pieces
    w.write(&[7, 8, 9, 10, 11, 12]).unwrap();
    w.write(&[0x80, 0xff, 0, 1]).unwrap();
    w.write(&2.5f32.to_le_bytes()).unwrap();
    assert!(!p.exists(), "the file must appear only when finished");
    w.finish().unwrap();
    let got = written(&p);
    let want: Vec<_> = entries.iter().map(|e| (e.name.clone(), e.dtype, e.shape.clone())).collect();
    assert_eq!(got, want);
    let f = TorchFile::open(&p, &["module"]).unwrap();
    assert_eq!(f.read("w").unwrap(), (1..=12).collect::<Vec<u8>>());
    assert_eq!(f.read("q").unwrap(), vec![0x80, 0xff, 0, 1]);
    assert_eq!(f.read("s").unwrap(), 2.5f32.to_le_bytes());
    assert!(f.read("e").unwrap().is_empty());
    // An unfinished writer leaves nothing behind, and the old file stays.
    let before = std::fs::read(&p).unwrap();
    let mut w = TorchWriter::create(&p, "x", &["module"], entries).unwrap();
    w.write(&[0; 5]).unwrap();
    drop(w);
    assert_eq!(std::fs::read(&p).unwrap(), before);
    assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
    // Too much data for a tensor is refused.
    let mut w = TorchWriter::create(
        &d.join("y.pt"),
        "y",
        &[],
        vec![TorchEntry { name: "a".into(), dtype: TorchDtype::U8, shape: vec![2] }],
    )
    .unwrap();
    assert!(w.write(&[1, 2, 3]).is_err());
}

/// torch.load reads what the writer wrote (skipped, with a note, without a Python that has torch;
/// `GLM_SAT_PYTHON` names one, default python3; `GLM_REQUIRE_SAT=1` makes a missing one a failure).
#[test]
fn torch_loads_what_we_write() {
    let py = std::env::var("GLM_SAT_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_torch =
        std::process::Command::new(&py).args(["-c", "import torch"]).output().is_ok_and(|o| o.status.success());
    if !has_torch {
        assert!(std::env::var("GLM_REQUIRE_SAT").is_err(), "GLM_REQUIRE_SAT=1 but {py} has no torch");
        eprintln!("note: no torch in {py}; torch.load of our files not checked");
        return;
    }
    let d = tmp("torchload");
    let p = d.join("m.pt");
    let dev = Device::Cpu;
    let a = candle_core::Tensor::arange(0f32, 6., &dev).unwrap().reshape((2, 3)).unwrap();
    let tensors = vec![
        ("a".to_string(), a.to_dtype(DType::F16).unwrap()),
        ("b".to_string(), a.to_dtype(DType::BF16).unwrap()),
        ("c".to_string(), a.to_dtype(DType::U8).unwrap()),
        ("d".to_string(), a.to_dtype(DType::I64).unwrap()),
    ];
    save_tensors(&p, &["module"], &tensors).unwrap();
    let script = format!(
        "import torch\nsd = torch.load({:?}, map_location='cpu')['module']\n\
         assert list(sd) == ['a', 'b', 'c', 'd'], list(sd)\n\
         for k, v in sd.items(): assert v.float().flatten().tolist() == [0, 1, 2, 3, 4, 5], (k, v)\n\
         assert sd['a'].dtype == torch.float16 and sd['b'].dtype == torch.bfloat16 and sd['c'].dtype == torch.uint8\n",
        p.display().to_string()
    );
    let out = std::process::Command::new(&py).args(["-c", &script]).output().unwrap();
    assert!(out.status.success(), "torch.load failed: {}", String::from_utf8_lossy(&out.stderr));
}
