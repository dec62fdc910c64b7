//! Data files as GLM-130B's tasks read them: JSON lines with `inputs_pretokenized`,
//! `choices_pretokenized`, `targets_pretokenized` (a string or a list) and `label`; language
//! modelling files hold documents under `text` (or `inputs_pretokenized`). Every error names the
//! file and line.

use std::path::Path;

use serde_json::Value;

use crate::{Error, Result};

/// One example of a file.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// The prompt (multiple choice, generation) or the document (language modelling).
    pub inputs: String,
    pub choices: Vec<String>,
    pub targets: Vec<String>,
    pub label: Option<usize>,
}

fn text_of(v: &Value) -> Option<String> {
    v.as_str().map(str::to_string)
}

fn strings(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(a) => a.iter().map(|x| x.as_str().map(str::to_string)).collect(),
        _ => None,
    }
}

/// Parse one line; `lm` asks for a document only.
pub fn parse_line(line: &str, lm: bool) -> std::result::Result<Example, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    let field = |names: &[&str]| names.iter().find_map(|n| obj.get(*n));
    // GLM-130B's tokenized Pile keeps ids under `text` and the string under `text_pretokenized`.
    let inputs = field(&["inputs_pretokenized", "text_pretokenized", "text", "inputs"])
        .map(|x| text_of(x).ok_or("`inputs_pretokenized` must be a string (token-id inputs are not supported)"))
        .transpose()?
        .ok_or("no `inputs_pretokenized` (or `text`)")?;
    if lm {
        return Ok(Example { inputs, choices: vec![], targets: vec![], label: None });
    }
    let choices = match field(&["choices_pretokenized", "choices"]) {
        Some(c) => strings(c).ok_or("`choices_pretokenized` must be a list of strings")?,
        None => vec![],
    };
    let targets = match field(&["targets_pretokenized", "targets"]) {
        Some(t) => strings(t).ok_or("`targets_pretokenized` must be a string or a list of strings")?,
        None => vec![],
    };
    let label = match obj.get("label") {
        None | Some(Value::Null) => None,
        Some(l) => Some(
            l.as_u64()
                .or_else(|| l.as_str().and_then(|s| s.trim().parse().ok()))
                .ok_or("`label` must be a non-negative integer")? as usize,
        ),
    };
    if let Some(l) = label {
        if !choices.is_empty() && l >= choices.len() {
            return Err(format!("label {l} but only {} choices", choices.len()));
        }
    }
    Ok(Example { inputs, choices, targets, label })
}

/// Every example of a file (blank lines skipped).
pub fn load_file(path: &Path, lm: bool) -> Result<Vec<Example>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| Error::Data {
        file: path.to_path_buf(),
        line: 1 + e.as_bytes()[..e.utf8_error().valid_up_to()].iter().filter(|&&b| b == b'\n').count(),
        msg: "not UTF-8".into(),
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let ex = parse_line(line, lm).map_err(|msg| Error::Data { file: path.to_path_buf(), line: i + 1, msg })?;
        out.push(ex);
    }
    if out.is_empty() {
        return Err(Error::Data { file: path.to_path_buf(), line: 0, msg: "no examples".into() });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glm_130b_lines_parse() {
        let e = parse_line(r#"{"inputs_pretokenized": "Q?", "choices_pretokenized": ["a", "b"], "label": 1}"#, false)
            .expect("mul");
        assert_eq!((e.inputs.as_str(), e.choices.len(), e.label), ("Q?", 2, Some(1)));
        let e = parse_line(r#"{"inputs_pretokenized": "Q", "targets_pretokenized": "word"}"#, false).expect("gen");
        assert_eq!(e.targets, vec!["word".to_string()]);
        let e = parse_line(r#"{"text": "a document"}"#, true).expect("lm");
        assert_eq!(e.inputs, "a document");
    }

    #[test]
    fn bad_lines_say_what_is_wrong_with_file_and_line() {
        for (line, want) in [
            ("{", "not JSON"),
            ("[1]", "object"),
            (r#"{"choices_pretokenized": ["a"]}"#, "inputs_pretokenized"),
            (r#"{"inputs_pretokenized": "q", "choices_pretokenized": ["a"], "label": 3}"#, "label 3"),
            (r#"{"inputs_pretokenized": "q", "label": -1}"#, "label"),
        ] {
            let e = parse_line(line, false).err().unwrap_or_default();
            assert!(e.contains(want), "{line}: {e}");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("d.jsonl");
        std::fs::write(&f, "{\"inputs_pretokenized\": \"ok\"}\n\n{oops\n").expect("write");
        let e = load_file(&f, false).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("d.jsonl") && e.contains("line 3"), "{e}");
        std::fs::write(&f, b"{\"inputs_pretokenized\": \"ok\"}\n\xff\n").expect("write");
        let e = load_file(&f, false).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("line 2") && e.contains("UTF-8"), "{e}");
    }
}
