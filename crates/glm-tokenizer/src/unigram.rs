//! Unigram segmentation: a byte trie over the pieces and SentencePiece's Viterbi (`EncodeOptimized`),
//! with f32 scores, first-best tie-breaking and byte fallback for unknown characters, so that ids
//! equal sentencepiece's. `Tokenizer::reference` is the slow twin built on the `tokenizers` crate's Unigram.

use std::collections::BTreeMap;

/// Byte trie; children of a node are contiguous and sorted by byte.
#[derive(Debug, Clone, Default)]
pub struct Trie {
    /// Per node: (first edge index, number of edges, piece id or u32::MAX).
    nodes: Vec<(u32, u32, u32)>,
    /// (byte, child node).
    edges: Vec<(u8, u32)>,
    /// Children of the root by byte (u32::MAX = none): the root is hit once per character.
    root: Vec<u32>,
}

impl Trie {
    pub fn build<'a>(keys: impl IntoIterator<Item = (&'a str, u32)>) -> Self {
        // Build with ordered maps, then flatten breadth first.
        let mut tmp: Vec<(BTreeMap<u8, usize>, u32)> = vec![(BTreeMap::new(), u32::MAX)];
        for (key, id) in keys {
            let mut node = 0;
            for &b in key.as_bytes() {
                let next = tmp.len();
                let child = *tmp[node].0.entry(b).or_insert(next);
                if child == next {
                    tmp.push((BTreeMap::new(), u32::MAX));
                }
                node = child;
            }
            tmp[node].1 = id;
        }
        let mut trie = Trie::default();
        let mut order = vec![0usize];
        let mut index = vec![u32::MAX; tmp.len()];
        index[0] = 0;
        let mut head = 0;
        while head < order.len() {
            let old = order[head];
            head += 1;
            for (_, &child) in tmp[old].0.iter() {
                index[child] = order.len() as u32;
                order.push(child);
            }
        }
        for &old in &order {
            let first = trie.edges.len() as u32;
            for (&b, &child) in tmp[old].0.iter() {
                trie.edges.push((b, index[child]));
            }
            trie.nodes.push((first, tmp[old].0.len() as u32, tmp[old].1));
        }
        trie.root = vec![u32::MAX; 256];
        for &(b, child) in &trie.edges[..tmp[0].0.len()] {
            trie.root[b as usize] = child;
        }
        trie
    }

    fn child(&self, node: u32, b: u8) -> Option<u32> {
        if node == 0 {
            let c = *self.root.get(b as usize)?;
            return (c != u32::MAX).then_some(c);
        }
        let (first, n, _) = *self.nodes.get(node as usize)?;
        let edges = self.edges.get(first as usize..(first + n) as usize)?;
        edges.binary_search_by_key(&b, |e| e.0).ok().map(|i| edges[i].1)
    }

    /// Calls `f(byte_len, id)` for every key that is a prefix of `s`, shortest first.
    #[inline]
    pub fn prefixes(&self, s: &[u8], mut f: impl FnMut(usize, u32)) {
        let mut node = 0u32;
        for (i, &b) in s.iter().enumerate() {
            match self.child(node, b) {
                Some(c) => node = c,
                None => return,
            }
            let id = self.nodes[node as usize].2;
            if id != u32::MAX {
                f(i + 1, id);
            }
        }
    }
}

/// What the segmenter needs to know about the vocabulary.
pub struct Lattice<'a> {
    pub trie: &'a Trie,
    /// Score used in the lattice for each piece id (user-defined pieces already boosted).
    pub scores: &'a [f32],
    pub unk_id: u32,
    pub unk_score: f32,
    /// Byte-fallback ids `<0x00>..<0xFF>`, if the vocabulary has them.
    pub bytes: Option<&'a [u32; 256]>,
}

struct Best {
    score: f32,
    start: u32,
    id: u32,
}

impl Lattice<'_> {
    /// Appends the ids of the best segmentation of `s` to `out`.
    pub fn segment(&self, s: &str, out: &mut Vec<u32>) {
        let b = s.as_bytes();
        let n = b.len();
        if n == 0 {
            return;
        }
        let mut best: Vec<Best> = Vec::with_capacity(n + 1);
        best.extend((0..=n).map(|_| Best { score: 0.0, start: u32::MAX, id: 0 }));
        let mut pos = 0;
        while pos < n {
            let base = best[pos].score;
            let mblen = utf8_len(b[pos]);
            let mut single = false;
            // As sentencepiece: the candidate is a double (its score expression mixes in a
            // double), compared with the stored float, then stored as a float.
            self.trie.prefixes(&b[pos..], |len, id| {
                let cand = self.scores[id as usize] as f64 + base as f64;
                let t = &mut best[pos + len];
                if t.start == u32::MAX || cand > t.score as f64 {
                    *t = Best { score: cand as f32, start: pos as u32, id };
                }
                single |= len == mblen;
            });
            if !single {
                let cand = self.unk_score as f64 + base as f64;
                let t = &mut best[pos + mblen];
                if t.start == u32::MAX || cand > t.score as f64 {
                    *t = Best { score: cand as f32, start: pos as u32, id: self.unk_id };
                }
            }
            pos += mblen;
        }
        let mark = out.len();
        let mut end = n;
        while end > 0 {
            let node = &best[end];
            let start = node.start as usize;
            if node.id == self.unk_id {
                if let Some(bytes) = self.bytes {
                    for &byte in b[start..end].iter().rev() {
                        out.push(bytes[byte as usize]);
                    }
                    end = start;
                    continue;
                }
            }
            out.push(node.id);
            end = start;
        }
        out[mark..].reverse();
    }
}

#[inline]
fn utf8_len(first: u8) -> usize {
    match first {
        0..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}
