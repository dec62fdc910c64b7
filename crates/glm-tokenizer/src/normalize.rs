//! SentencePiece's text normalizer: a precompiled character map (a Darts double-array trie of
//! source byte strings -> replacement strings, e.g. NFKC for `nmt_nfkc`), optional removal of
//! extra whitespace, the dummy "▁" prefix and the escaping of spaces as "▁".
//!
//! The loop mirrors sentencepiece's `Normalizer::Normalize`: at each position the longest
//! charsmap match wins (user-defined symbols are copied verbatim first); invalid UTF-8 cannot
//! occur since input is `&str`.

use crate::TokenizerError;

pub const SPACE: char = '\u{2581}';
pub const SPACE_STR: &str = "\u{2581}";

/// Darts double-array units plus the NUL-separated replacement strings.
#[derive(Debug, Clone)]
pub struct CharsMap {
    units: Vec<u32>,
    normalized: Vec<u8>,
}

impl CharsMap {
    /// Parses a `precompiled_charsmap` blob: u32 LE trie size in bytes, the trie units, then the
    /// replacement strings.
    pub fn from_blob(blob: &[u8]) -> Result<Self, TokenizerError> {
        let bad = |m: &str| TokenizerError::Format(format!("precompiled_charsmap ({} bytes): {m}", blob.len()));
        if blob.len() < 4 {
            return Err(bad("shorter than its 4-byte header"));
        }
        let trie_size = u32::from_le_bytes([blob[0], blob[1], blob[2], blob[3]]) as usize;
        if !trie_size.is_multiple_of(4) || 4 + trie_size > blob.len() {
            return Err(bad(&format!("trie size {trie_size} does not fit")));
        }
        let units =
            blob[4..4 + trie_size].chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        Ok(Self { units, normalized: blob[4 + trie_size..].to_vec() })
    }

    fn unit(&self, i: usize) -> Option<u32> {
        self.units.get(i).copied()
    }

    /// Longest prefix of `key` in the map: (matched byte length, replacement).
    pub fn longest_match(&self, key: &[u8]) -> Option<(usize, &str)> {
        // Darts unit layout: offset = (u >> 10) << ((u & (1 << 9)) >> 6); label = u & ((1 << 31) | 0xff);
        // has_leaf = (u >> 8) & 1; value = u & ((1 << 31) - 1).
        let offset = |u: u32| ((u >> 10) << ((u & (1 << 9)) >> 6)) as usize;
        let mut node = offset(self.unit(0)?);
        let mut best = None;
        for (i, &b) in key.iter().enumerate() {
            node ^= b as usize;
            let u = self.unit(node)?;
            if (u & ((1 << 31) | 0xff)) != b as u32 {
                break;
            }
            node ^= offset(u);
            if (u >> 8) & 1 == 1 {
                let value = (self.unit(node)? & ((1 << 31) - 1)) as usize;
                best = Some((i + 1, value));
            }
        }
        let (len, value) = best?;
        let tail = self.normalized.get(value..)?;
        let end = tail.iter().position(|&c| c == 0).unwrap_or(tail.len());
        let s = std::str::from_utf8(&tail[..end]).ok()?;
        Some((len, s))
    }
}

/// SentencePiece normalizer settings (NormalizerSpec).
#[derive(Debug, Clone)]
pub struct Normalizer {
    pub charsmap: Option<CharsMap>,
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
    pub escape_whitespaces: bool,
}

impl Normalizer {
    /// The lossless normalizer of tokenizers trained here: dummy prefix and "▁" escaping only.
    pub fn lossless() -> Self {
        Self { charsmap: None, add_dummy_prefix: true, remove_extra_whitespaces: false, escape_whitespaces: true }
    }

    /// One normalization step at the start of `input`: (replacement, consumed bytes).
    fn prefix<'a>(&'a self, input: &'a str, user: &[String]) -> (&'a str, usize) {
        for u in user {
            if input.starts_with(u) {
                return (&input[..u.len()], u.len());
            }
        }
        if let Some(map) = &self.charsmap {
            if let Some((n, s)) = map.longest_match(input.as_bytes()) {
                return (s, n);
            }
        }
        let n = input.chars().next().map_or(0, char::len_utf8);
        (&input[..n], n)
    }

    /// Normalizes `input` as sentencepiece does. `user` = user-defined symbols, longest first.
    pub fn normalize(&self, input: &str, user: &[String]) -> String {
        let mut out = String::with_capacity(input.len() + 3);
        let mut rest = input;
        if self.remove_extra_whitespaces {
            while !rest.is_empty() {
                let (s, n) = self.prefix(rest, user);
                if s != " " {
                    break;
                }
                rest = &rest[n..];
            }
        }
        if rest.is_empty() {
            return out;
        }
        let space = if self.escape_whitespaces { SPACE_STR } else { " " };
        if self.add_dummy_prefix {
            out.push_str(space);
        }
        let mut prev_space = self.remove_extra_whitespaces;
        while !rest.is_empty() {
            let (mut s, n) = self.prefix(rest, user);
            while prev_space && s.starts_with(' ') {
                s = &s[1..];
            }
            if !s.is_empty() {
                for c in s.chars() {
                    if c == ' ' {
                        out.push_str(space);
                    } else {
                        out.push(c);
                    }
                }
                prev_space = s.ends_with(' ');
            }
            rest = &rest[n..];
            if !self.remove_extra_whitespaces {
                prev_space = false;
            }
        }
        if self.remove_extra_whitespaces {
            while out.ends_with(space) {
                out.truncate(out.len() - space.len());
            }
        }
        out
    }
}
