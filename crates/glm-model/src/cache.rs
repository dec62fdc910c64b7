//! The KV cache for incremental decoding: per layer, keys and values [B, N, cap, D] in buffers that
//! grow by doubling, written in place, so a decode step copies only its own new keys and values
//! (not the whole history, as concatenation would). Inference only: the in-place writes are not
//! seen by autograd, so training runs the full forward.

use candle_core::Tensor;

use crate::config::Config;
use crate::{Error, Result};

/// Smallest buffer, in tokens.
const MIN_CAPACITY: usize = 16;

#[derive(Debug)]
pub(crate) struct LayerKv {
    k: Tensor, // (B, N, cap, D)
    v: Tensor, // (B, N, cap, D)
    len: usize,
}

impl LayerKv {
    fn alloc(like: &Tensor, cap: usize) -> Result<Tensor> {
        let (b, n, _, d) = like.dims4()?;
        Ok(Tensor::zeros((b, n, cap, d), like.dtype(), like.device())?)
    }

    fn new(k: &Tensor, v: &Tensor) -> Result<Self> {
        let cap = KvCache::capacity_for(k.dim(2)?);
        Ok(Self { k: Self::alloc(k, cap)?, v: Self::alloc(v, cap)?, len: 0 })
    }

    /// Append k, v [B, N, T, D]; returns all keys and values so far, [B, N, len, D] views.
    pub(crate) fn append(slot: &mut Option<Self>, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let this = match slot {
            Some(s) => s,
            None => slot.insert(Self::new(k, v)?),
        };
        let t = k.dim(2)?;
        let cap = this.k.dim(2)?;
        if this.len + t > cap {
            let cap = KvCache::capacity_for(this.len + t);
            let (nk, nv) = (Self::alloc(&this.k, cap)?, Self::alloc(&this.v, cap)?);
            nk.slice_set(&this.k.narrow(2, 0, this.len)?.contiguous()?, 2, 0)?;
            nv.slice_set(&this.v.narrow(2, 0, this.len)?.contiguous()?, 2, 0)?;
            (this.k, this.v) = (nk, nv);
        }
        this.k.slice_set(&k.contiguous()?, 2, this.len)?;
        this.v.slice_set(&v.contiguous()?, 2, this.len)?;
        this.len += t;
        Ok((this.k.narrow(2, 0, this.len)?, this.v.narrow(2, 0, this.len)?))
    }

    fn batch(&self) -> usize {
        self.k.dims().first().copied().unwrap_or(0)
    }
}

/// Keys and values of every layer seen so far.
#[derive(Debug, Default)]
pub struct KvCache {
    pub(crate) layers: Vec<Option<LayerKv>>,
}

impl KvCache {
    pub fn new(cfg: &Config) -> Self {
        Self { layers: (0..cfg.num_layers).map(|_| None).collect() }
    }

    /// Tokens the buffers hold once a row has `tokens` (they grow by doubling): what a row of
    /// that length occupies.
    pub fn capacity_for(tokens: usize) -> usize {
        tokens.next_power_of_two().max(MIN_CAPACITY)
    }

    /// Bytes of keys and values one cached token takes over all layers of `cfg`, in `dtype`.
    pub fn bytes_per_token(cfg: &Config, dtype: candle_core::DType) -> u64 {
        (2 * cfg.num_layers * cfg.hidden_size * dtype.size_in_bytes()) as u64
    }

    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Some(l)) => l.len,
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Batch size of the cached sequences (None while empty).
    pub fn batch(&self) -> Option<usize> {
        match self.layers.first() {
            Some(Some(l)) => Some(l.batch()),
            _ => None,
        }
    }

    /// Before a forward of `batch` rows on a model of `cfg`: an empty cache takes the model's
    /// layer count; a filled one must match it and the batch. Returns the tokens cached so far.
    pub(crate) fn prepare(&mut self, cfg: &Config, batch: usize) -> Result<usize> {
        if self.layers.len() != cfg.num_layers {
            if !self.is_empty() {
                return Err(Error::Input(format!(
                    "KV cache holds {} layers, the model has {}",
                    self.layers.len(),
                    cfg.num_layers
                )));
            }
            *self = Self::new(cfg);
        }
        match self.batch() {
            Some(cb) if cb != batch => Err(Error::Input(format!("KV cache holds batch {cb}, input has batch {batch}"))),
            _ => Ok(self.len()),
        }
    }

    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
    }

    /// An independent copy (e.g. to fork a beam): the buffers are copied, never shared, since
    /// appends write into them in place.
    pub fn fork(&self) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| match l {
                Some(l) => Ok(Some(LayerKv { k: l.k.copy()?, v: l.v.copy()?, len: l.len })),
                None => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }
}
