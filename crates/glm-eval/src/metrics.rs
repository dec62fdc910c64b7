//! The metrics of GLM-130B's evaluation (spec section 7): accuracy, exact match and F1 after
//! SQuAD's answer normalization, word-level perplexity and bits per byte from summed losses.

/// SQuAD's `normalize_answer`: lower case, no punctuation, no articles (a, an, the), single spaces.
pub fn normalize_answer(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punct: String = lower.chars().filter(|c| !c.is_ascii_punctuation()).collect();
    no_punct.split_whitespace().filter(|w| !matches!(*w, "a" | "an" | "the")).collect::<Vec<_>>().join(" ")
}

/// 1 when the normalized strings are equal.
pub fn exact_match(prediction: &str, truth: &str) -> f64 {
    (normalize_answer(prediction) == normalize_answer(truth)) as u8 as f64
}

/// SQuAD's token F1 over normalized whitespace tokens (bag of words with counts).
pub fn f1(prediction: &str, truth: &str) -> f64 {
    let (p, t) = (normalize_answer(prediction), normalize_answer(truth));
    let (p, t): (Vec<&str>, Vec<&str>) = (p.split_whitespace().collect(), t.split_whitespace().collect());
    if p.is_empty() || t.is_empty() {
        return (p == t) as u8 as f64;
    }
    let mut left: Vec<&str> = t.clone();
    let mut common = 0usize;
    for w in &p {
        if let Some(i) = left.iter().position(|x| x == w) {
            left.swap_remove(i);
            common += 1;
        }
    }
    if common == 0 {
        return 0.0;
    }
    let (precision, recall) = (common as f64 / p.len() as f64, common as f64 / t.len() as f64);
    2.0 * precision * recall / (precision + recall)
}

/// The best score over several accepted answers (0 when there are none).
pub fn best_over(prediction: &str, truths: &[String], metric: fn(&str, &str) -> f64) -> f64 {
    truths.iter().map(|t| metric(prediction, t)).fold(0.0, f64::max)
}

/// The first word, stripped of surrounding punctuation (GLM-130B's LAMBADA judging).
pub fn first_word(s: &str) -> String {
    s.split_whitespace().next().unwrap_or("").trim_matches(|c: char| !c.is_alphanumeric()).to_string()
}

/// Word-level perplexity: exp(total loss in nats / whitespace-separated words).
pub fn perplexity(loss_nats: f64, words: usize) -> f64 {
    (loss_nats / words.max(1) as f64).exp()
}

/// Bits per UTF-8 byte: total loss in nats / bytes / ln 2.
pub fn bits_per_byte(loss_nats: f64, bytes: usize) -> f64 {
    loss_nats / bytes.max(1) as f64 / std::f64::consts::LN_2
}

/// Fraction of predictions equal to their labels.
pub fn accuracy(predictions: &[usize], labels: &[usize]) -> f64 {
    if labels.is_empty() {
        return 0.0;
    }
    predictions.iter().zip(labels).filter(|(p, l)| p == l).count() as f64 / labels.len() as f64
}

/// Median of values (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squad_normalization_em_and_f1_by_hand() {
        assert_eq!(normalize_answer("The  Cat, sat!"), "cat sat");
        assert_eq!(exact_match("the cat", "Cat."), 1.0);
        assert_eq!(exact_match("a dog", "cat"), 0.0);
        // prediction "cat sat on mat" vs truth "the cat sat": common 2, p = 2/4, r = 2/2, F1 = 2/3.
        assert!((f1("cat sat on mat", "the cat sat") - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(f1("", ""), 1.0);
        assert_eq!(f1("x", ""), 0.0);
        // Counted with multiplicity: "a a b" vs "a b b" -> "b" and "b b" after dropping articles.
        assert!((f1("cat cat dog", "cat dog dog") - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(best_over("Paris", &["London".into(), "paris".into()], exact_match), 1.0);
        assert_eq!(first_word(" \"Hello,\" she said"), "Hello");
    }

    #[test]
    fn perplexity_bpb_accuracy_by_hand() {
        // 4 words with total loss 4 ln 2 nats: PPL 2.
        assert!((perplexity(4.0 * 2f64.ln(), 4) - 2.0).abs() < 1e-12);
        // 8 ln 2 nats over 4 bytes: 2 bits per byte.
        assert!((bits_per_byte(8.0 * 2f64.ln(), 4) - 2.0).abs() < 1e-12);
        assert_eq!("中文".len(), 6); // bytes, not characters, are counted
        assert_eq!(accuracy(&[0, 1, 2, 3], &[0, 1, 0, 0]), 0.5);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
