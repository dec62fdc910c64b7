//! The `glm` binary's interface that scripts rely on.

use std::process::Command;

fn glm(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_glm")).args(args).output().expect("run glm");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn info_json_has_the_exact_parameter_count() {
    let (ok, out, err) = glm(&["info", "--preset", "glm-130b", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(v["params"], 128_697_794_560u64);
    assert_eq!(v["weight_bytes"]["fp16"], 2 * 128_697_794_560u64);
    assert!(v["weight_bytes"]["int8"].as_u64().unwrap() < v["weight_bytes"]["fp16"].as_u64().unwrap());
    assert!(v["weight_bytes"]["int4"].as_u64().unwrap() < v["weight_bytes"]["int8"].as_u64().unwrap());
}

#[test]
fn config_roundtrips_through_a_file_and_bad_input_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("glm-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny.json");
    let p = path.to_str().unwrap();
    assert!(glm(&["config", "--preset", "tiny", "--out", p]).0);
    let (ok, out, _) = glm(&["info", "--config", p, "--json"]);
    assert!(ok);
    assert_eq!(serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()["params"], 1_908_480u64);

    std::fs::write(&path, r#"{"name": "x"}"#).unwrap();
    let (ok, _, err) = glm(&["info", "--config", p]);
    assert!(!ok && err.contains("tiny.json") && err.contains("bad config JSON"), "{err}");
    std::fs::write(&path, [0xffu8, 0xfe, 0x00]).unwrap();
    let (ok, _, err) = glm(&["info", "--config", p]);
    assert!(!ok && err.contains("tiny.json"), "{err}");
    let (ok, _, err) = glm(&["info", "--preset", "huge"]);
    assert!(!ok && err.contains("tiny"), "{err}");
}
