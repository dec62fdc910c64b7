use glm_tokenizer::*;
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let text = std::fs::read_to_string(&args[1]).unwrap();
    let docs: Vec<String> = text.split("\n\n").map(|s| s.to_string()).collect();
    let t0 = std::time::Instant::now();
    let (tok, rep) = train(&docs, &TrainOptions { vocab_size: args[2].parse().unwrap(), show_progress: false, ..Default::default() }).unwrap();
    eprintln!("{:?} {:?} {:?}", rep, t0.elapsed(), tok);
    for s in ["Hello world, 今天天气很好。\n\n  x\t[gMASK]<sop> y ▁z 😀", " lead", "", "a  b   c", "[MASK]"] {
        let ids = tok.encode(s);
        let p: Vec<_> = ids.iter().map(|&i| tok.piece(i).unwrap()).collect();
        let d = tok.decode(&ids).unwrap();
        println!("{s:?} -> {p:?} -> {d:?} {}", d == s);
    }
    tok.save(std::path::Path::new("/tmp/tok.json")).unwrap();
    let t2 = Tokenizer::from_file(std::path::Path::new("/tmp/tok.json")).unwrap();
    let hf = tokenizers::Tokenizer::from_file("/tmp/tok.json").unwrap();
    let mut bad = 0;
    for d in &docs { let a = t2.encode(d); let b = hf.encode(d.as_str(), false).unwrap().get_ids().to_vec(); if a != b { bad += 1; if bad < 3 { println!("HF MISMATCH {:?}\n{:?}\n{:?}", d, a, b);} } 
      let n: String = d.chars().collect(); let _ = n; }
    println!("hf mismatches {bad}/{}", docs.len());
    let t0 = std::time::Instant::now();
    let mut n = 0; for d in &docs { n += t2.encode(d).len(); }
    let el = t0.elapsed().as_secs_f64();
    println!("encode {} tokens {:.2} MB/s", n, text.len() as f64 / el / 1e6);
}
