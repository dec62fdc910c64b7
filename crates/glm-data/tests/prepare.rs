//! Inputs, shards and `prepare`: formats, determinism, and bad input named by file and line.

use std::io::Write;
use std::path::Path;

use glm_data::input::{InputOptions, Skipped, TextSplit};
use glm_data::prepare::{self, PrepareOptions};
use glm_data::shard::{Shard, ShardHeader};
use glm_tokenizer::Tokenizer;

fn tok() -> Tokenizer {
    Tokenizer::default_glm().unwrap()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, bytes).unwrap();
    p.display().to_string()
}

fn gz(text: &str) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(text.as_bytes()).unwrap();
    e.finish().unwrap()
}

fn opts(inputs: Vec<String>, out: &Path) -> PrepareOptions {
    PrepareOptions {
        inputs,
        out: out.to_path_buf(),
        input: InputOptions::default(),
        shards: 2,
        seed: 7,
        progress: false,
    }
}

#[test]
fn prepares_text_jsonl_gzip_directories_and_globs() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "in/a.txt", "Call me Ishmael. Some years ago.\n".as_bytes());
    write(d.path(), "in/sub/b.jsonl", "{\"content\": \"今天天气很好。\"}\n\n{\"content\": \"第二篇。\"}\n".as_bytes());
    write(d.path(), "in/c.jsonl.gz", &gz("{\"content\": \"gzip'd document\"}\n"));
    write(d.path(), "more/d.txt", b"glob matched");
    let t = tok();
    let mut o = opts(
        vec![d.path().join("in").display().to_string(), format!("{}/more/*.txt", d.path().display())],
        &d.path().join("out"),
    );
    o.input.field = "content".into();
    let r = prepare::prepare(&t, "h1", &o).unwrap();
    assert_eq!((r.files, r.documents, r.shards.len()), (4, 5, 2));
    let shards = prepare::open(&d.path().join("out"), Some("h1")).unwrap();
    let mut texts = Vec::new();
    for s in &shards {
        for i in 0..s.num_docs() {
            let mut ids = Vec::new();
            s.read(i, 0, s.doc_len(i), &mut ids);
            texts.push(t.decode(&ids).unwrap());
        }
    }
    texts.sort();
    assert_eq!(
        texts,
        ["Call me Ishmael. Some years ago.\n", "glob matched", "gzip'd document", "今天天气很好。", "第二篇。"]
    );
    // Same inputs and seed: byte-identical shards.
    let o2 = PrepareOptions { out: d.path().join("out2"), ..o.clone() };
    prepare::prepare(&t, "h1", &o2).unwrap();
    for name in &r.shards {
        assert_eq!(
            std::fs::read(d.path().join("out").join(name)).unwrap(),
            std::fs::read(d.path().join("out2").join(name)).unwrap()
        );
    }
    // Another tokenizer's shards are refused.
    let e = prepare::open(&d.path().join("out"), Some("h2")).err().unwrap().to_string();
    assert!(e.contains("glm data prepare"), "{e}");
}

#[test]
fn bad_input_names_file_and_line_or_is_skipped_and_counted() {
    let d = tempfile::tempdir().unwrap();
    let bad_utf8 = write(d.path(), "bad.txt", b"good line\nbad \xff\xfe byte");
    let empty = write(d.path(), "empty.txt", b"  \n");
    let bad_json = write(d.path(), "bad.jsonl", b"{\"text\": \"ok\"}\n{\"text\": oops}\n");
    let no_field = write(d.path(), "nofield.jsonl", b"{\"body\": \"x\"}\n");
    let t = tok();
    let out = d.path().join("out");
    let err = |inp: &str| prepare::prepare(&t, "h", &opts(vec![inp.to_string()], &out)).err().unwrap().to_string();
    let e = err(&bad_utf8);
    assert!(e.contains("bad.txt") && e.contains("byte offset 14") && e.contains("line 2"), "{e}");
    let e = err(&empty);
    assert!(e.contains("empty.txt") && e.contains("empty"), "{e}");
    let e = err(&bad_json);
    assert!(e.contains("bad.jsonl:2") && e.contains("malformed JSON"), "{e}");
    // Failing midway leaves neither side files nor half-written shards.
    let left: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "{left:?}");
    let e = err(&no_field);
    assert!(e.contains("nofield.jsonl:1") && e.contains("\"text\""), "{e}");
    let e = err(&d.path().join("nothing*.txt").display().to_string());
    assert!(e.contains("matches no files"), "{e}");

    // Asked to skip: skipped and counted, the good documents kept.
    let mut o = opts(vec![d.path().display().to_string()], &out);
    o.input.skip_bad = true;
    o.shards = 1;
    let r = prepare::prepare(&t, "h", &o).unwrap();
    assert_eq!(r.documents, 1, "only {{\"text\": \"ok\"}} survives");
    assert_eq!((r.skipped.files, r.skipped.lines), (2, 2), "{:?}", r.skipped);
}

#[test]
fn text_files_split_into_documents() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "p.txt", b"one\r\ntwo\n\nthree\n\n\nfour\n");
    let read = |split| {
        let mut docs = Vec::new();
        let o = InputOptions { split, ..Default::default() };
        glm_data::input::read_file(Path::new(&p), &o, &mut Skipped::default(), &mut |x| docs.push(x)).unwrap();
        docs
    };
    assert_eq!(read(TextSplit::File), ["one\ntwo\n\nthree\n\n\nfour\n"]);
    assert_eq!(read(TextSplit::Paragraph), ["one\ntwo", "three", "four"]);
    assert_eq!(read(TextSplit::Line), ["one", "two", "three", "four"]);
}

#[test]
fn shards_with_wrong_magic_version_or_length_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("s.bin");
    let h = ShardHeader { tokenizer: "t".into(), vocab_size: 100, index: 0, count: 1, created_by: "test".into() };
    Shard::write(&p, &h, &[vec![1, 2, 3], vec![], vec![99]]).unwrap();
    let s = Shard::open(&p).unwrap();
    assert_eq!((s.num_docs(), s.num_tokens(), s.doc_len(2)), (3, 4, 1));
    let good = std::fs::read(&p).unwrap();
    let check = |bytes: &[u8], want: &[&str]| {
        std::fs::write(&p, bytes).unwrap();
        let e = Shard::open(&p).err().unwrap().to_string();
        for w in want {
            assert!(e.contains(w), "{e} lacks {w}");
        }
    };
    let mut b = good.clone();
    b[0] = b'X';
    check(&b, &["wrong magic", "glm data prepare", "s.bin"]);
    let mut b = good.clone();
    b[8] = 9;
    check(&b, &["version 9", "glm data prepare"]);
    check(&good[..good.len() - 1], &["truncated", "glm data prepare"]);
    check(b"", &["wrong magic"]);
    // A token outside the vocabulary is not written.
    assert!(Shard::write(&p, &h, &[vec![100]]).unwrap_err().to_string().contains("vocab size"));
}
