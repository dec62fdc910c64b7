//! The GLM model, written like the equations of spec section 1:
//!
//! ```text
//! x = E[tokens]
//! per layer:  a = LN1(x);  y = alpha*a + Attn(a);  m = LN2(y);  x = alpha*m + FFN(m)
//! logits = LN_final(x) · Eᵀ          (or · lm_headᵀ when the head is untied)
//! ```
//!
//! Every projection comes from a `LinearFactory` (dense, quantized or tensor-parallel: one model for
//! all). Masks and positions arrive as a per-row `AttnLayout` and position ids. The KV cache is an
//! argument, so the model stays `&self` and one model can serve many sequences.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use glm_checkpoint::Checkpoint;
use std::sync::Arc;

use glm_nn::dropout::HeadSlice;
use glm_nn::{AttnLayout, LayerNorm, Linear, LinearFactory, LinearSpec, ParallelRole, Rope, VocabTable};
use rayon::prelude::*;

use crate::cache::{KvCache, LayerKv};
use crate::config::{Config, FfnKind};
use crate::stage::StageSpec;
use crate::weights::*;
use crate::{Error, Result};

/// Values every layer of one forward shares.
struct Step<'a> {
    rope: &'a Rope,
    /// The sequences of the input along the token dim: one part covering it all, or one per
    /// sequence of a ragged batch (each continuing its own KV cache).
    parts: Vec<Part>,
    train: Option<&'a TrainOptions>,
}

/// Tokens start..start + len of the input (dim 1), attending among themselves and their cache.
#[derive(Clone)]
struct Part {
    start: usize,
    len: usize,
    cos: Tensor, // (B, 1, T, D)
    sin: Tensor, // (B, 1, T, D)
    /// The tables times 1/sqrt(D), for q: the attention scale costs no pass over q.
    cos_q: Tensor,
    sin_q: Tensor,
    mask: Tensor, // (B, 1, T, T_past + T), additive, f32
}

/// One sequence of a ragged batch ([`Glm::forward_sequences`]): new tokens continuing its own cache.
pub struct Sequence<'a> {
    pub ids: &'a [u32],
    /// One per token, or for 2-D RoPE the first dimension's then the second's (2 per token).
    pub positions: &'a [u32],
    /// The sequence's layout (one row); the new tokens are its positions cache.len()...
    pub layout: &'a AttnLayout,
    pub cache: &'a mut KvCache,
}

/// A forward of one sequence run a few layers at a time ([`Glm::begin`], [`Glm::advance`]), so a
/// long prefill can be spread over several steps of a server: the hidden states between layers.
/// The ops are `forward_sequences`'s, so the logits are the same however the layers are split.
pub struct Partial {
    x: Tensor, // (1, T, H)
    part: Part,
    /// The next layer to run.
    next: usize,
}

impl Partial {
    /// Layers not run yet.
    pub fn layers_left(&self, model: &Glm) -> usize {
        model.stage.layers.end.saturating_sub(self.next)
    }
}

/// Layer `layer`'s cache slot of each part.
type Slots<'c> = Vec<Option<&'c mut Option<LayerKv>>>;

/// What a training forward adds to inference: dropout (seeded per step, layer and site, so a resumed
/// run drops the same elements) and embedding gradient shrink.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainOptions {
    /// Dropout on the attention and FFN outputs, before each residual sum.
    pub hidden_dropout: f32,
    /// Dropout on the attention probabilities.
    pub attention_dropout: f32,
    /// EGS (spec section 4): `e = alpha * e + (1 - alpha) * e.detach()`, so the forward is unchanged
    /// and the gradient into the embedding is scaled by alpha. 1 turns it off.
    pub egs_alpha: f64,
    /// Mixed into every dropout mask; a training run passes a function of (run seed, step, micro-batch).
    pub seed: u64,
}

impl<'a> Step<'a> {
    /// Dropout at one site of one layer (identity at inference or with p = 0). `heads`: x is
    /// (B, n, ..) holding that block of the heads (tensor parallel), masked as in the full tensor.
    fn dropout(
        &self,
        x: Tensor,
        layer: usize,
        site: u64,
        pick: fn(&TrainOptions) -> f32,
        heads: Option<HeadSlice>,
    ) -> Result<Tensor> {
        match self.train {
            Some(t) if pick(t) > 0.0 => {
                let seed = glm_nn::dropout::site_seed(&[t.seed, layer as u64, site]);
                Ok(glm_nn::dropout::dropout_heads(&x, pick(t), seed, heads)?)
            }
            _ => Ok(x),
        }
    }
}

struct Attention {
    query_key_value: Box<dyn Linear>,
    dense: Box<dyn Linear>,
    /// The heads this rank computes: all of them, or a block under tensor parallelism.
    num_heads: usize,
    heads: HeadSlice,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &Config, vb: &VarBuilder, lin: &dyn LinearFactory) -> Result<Self> {
        let h = cfg.hidden_size;
        let spec = |name, out_dim, role| LinearSpec { name, in_dim: h, out_dim, bias: true, role };
        let (rank, ranks) = lin.tp();
        let local = cfg.num_heads / ranks.max(1);
        Ok(Self {
            // One column chunk: heads are contiguous [q|k|v] blocks of 3D rows, so a rank's slice
            // of rows holds whole heads.
            query_key_value: lin.make(vb, spec(QKV, 3 * h, ParallelRole::Column { chunks: 1 }))?,
            dense: lin.make(vb, spec(DENSE, h, ParallelRole::Row))?,
            num_heads: local,
            heads: HeadSlice { offset: rank * local, total: cfg.num_heads },
            head_dim: cfg.head_dim(),
        })
    }

    fn forward(&self, x: &Tensor, step: &Step, layer: usize, slots: &mut Slots) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (n, d) = (self.num_heads, self.head_dim);
        // (B, T, N, 3D): the fused weight is per-head interleaved, q | k | v inside each head.
        let qkv = self.query_key_value.forward(x)?.reshape((b, t, n, 3 * d))?;
        let one = |(part, slot): (&Part, &mut Option<&mut Option<LayerKv>>)| {
            let qkv = if part.len == t { qkv.clone() } else { qkv.narrow(1, part.start, part.len)? };
            self.attend(&qkv, part, step, layer, slot.as_deref_mut())
        };
        // The sequences of a ragged batch attend independently (each over its own cache): in
        // parallel, so the small per-sequence ops of a decode step use every core.
        let mut ctx: Vec<Tensor> = if step.parts.len() > 1 {
            step.parts.par_iter().zip(slots.par_iter_mut()).map(one).collect::<Result<_>>()?
        } else {
            step.parts.iter().zip(slots.iter_mut()).map(one).collect::<Result<_>>()?
        };
        let ctx = if ctx.len() == 1 { ctx.remove(0) } else { Tensor::cat(&ctx, 1)? }; // (B, T, H)
        step.dropout(self.dense.forward(&ctx)?, layer, 1, |t| t.hidden_dropout, None)
    }

    /// softmax(rope(q) rope(k)ᵀ / sqrt(D) + mask) v for one part: qkv (B, T, N, 3D) -> (B, T, H).
    fn attend(
        &self,
        qkv: &Tensor,
        part: &Part,
        step: &Step,
        layer: usize,
        cache: Option<&mut Option<LayerKv>>,
    ) -> Result<Tensor> {
        let (b, t, n, _) = qkv.dims4()?;
        let d = self.head_dim;
        let heads = |i: usize| qkv.narrow(3, i * d, d)?.transpose(1, 2)?.contiguous(); // (B, N, T, D)
        let q = step.rope.apply(&heads(0)?, &part.cos_q, &part.sin_q)?; // rope(q) / sqrt(D)
        let mut k = step.rope.apply(&heads(1)?, &part.cos, &part.sin)?;
        let mut v = heads(2)?;
        if let Some(slot) = cache {
            (k, v) = LayerKv::append(slot, &k, &v)?; // (B, N, T_past + T, D)
        }
        let scores = glm_nn::blas::matmul(&q, &k, true)?; // q kᵀ, (B, N, T, T_k)
                                                          // Softmax in f32 whatever the activation dtype.
        let probs = glm_nn::masked_softmax(&scores.to_dtype(DType::F32)?, &part.mask)?;
        let probs = step.dropout(probs, layer, 0, |t| t.attention_dropout, Some(self.heads))?.to_dtype(v.dtype())?;
        let ctx = glm_nn::blas::matmul(&probs, &v, false)?; // (B, N, T, D)
        Ok(ctx.transpose(1, 2)?.reshape((b, t, n * d))?)
    }
}

struct Mlp {
    dense_h_to_4h: Box<dyn Linear>,
    dense_4h_to_h: Box<dyn Linear>,
    kind: FfnKind,
}

impl Mlp {
    fn new(cfg: &Config, vb: &VarBuilder, lin: &dyn LinearFactory) -> Result<Self> {
        let (h, f, up) = (cfg.hidden_size, cfg.ffn_hidden_size, cfg.ffn_up_size());
        let chunks = match cfg.ffn {
            FfnKind::GeGlu => 2,
            FfnKind::GeluTanh => 1,
        };
        let up_spec =
            LinearSpec { name: H_TO_4H, in_dim: h, out_dim: up, bias: true, role: ParallelRole::Column { chunks } };
        let down_spec = LinearSpec { name: FOURH_TO_H, in_dim: f, out_dim: h, bias: true, role: ParallelRole::Row };
        Ok(Self { dense_h_to_4h: lin.make(vb, up_spec)?, dense_4h_to_h: lin.make(vb, down_spec)?, kind: cfg.ffn })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let u = self.dense_h_to_4h.forward(x)?; // (B, T, 2F) or (B, T, F)
        let act = match self.kind {
            // GeGLU: the first half is linear, the second half goes through exact (erf) GELU.
            FfnKind::GeGlu => glm_nn::kernels::geglu(&u)?, // x1 * gelu_erf(x2), (B, T, F)
            FfnKind::GeluTanh => u.gelu()?,
        };
        Ok(self.dense_4h_to_h.forward(&act)?)
    }
}

struct Block {
    input_layernorm: LayerNorm,
    attention: Attention,
    post_attention_layernorm: LayerNorm,
    mlp: Mlp,
    alpha: f64,
}

impl Block {
    fn new(cfg: &Config, vb: VarBuilder, lin: &dyn LinearFactory) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.layernorm_eps);
        Ok(Self {
            input_layernorm: LayerNorm::load(vb.pp(INPUT_LAYERNORM), h, eps)?,
            attention: Attention::new(cfg, &vb.pp(ATTENTION), lin)?,
            post_attention_layernorm: LayerNorm::load(vb.pp(POST_ATTENTION_LAYERNORM), h, eps)?,
            mlp: Mlp::new(cfg, &vb.pp(MLP), lin)?,
            alpha: cfg.deepnorm_alpha(),
        })
    }

    fn forward(&self, x: &Tensor, step: &Step, layer: usize, slots: &mut Slots) -> Result<Tensor> {
        // a = LN1(x);  y = alpha*a + Attn(a);  m = LN2(y);  x = alpha*m + FFN(m)   (dropout on Attn, FFN)
        let a = self.input_layernorm.forward(x)?;
        let y = ((&a * self.alpha)? + self.attention.forward(&a, step, layer, slots)?)?;
        let m = self.post_attention_layernorm.forward(&y)?;
        let ffn = step.dropout(self.mlp.forward(&m)?, layer, 2, |t| t.hidden_dropout, None)?;
        Ok(((&m * self.alpha)? + ffn)?)
    }
}

/// What a pipeline stage starts from: token ids on the first stage, the previous stage's hidden
/// states (B, T, H) on the others.
pub enum StageInput<'a> {
    Ids(&'a Tensor),
    Hidden(&'a Tensor),
}

pub struct Glm {
    cfg: Config,
    /// The layers (and ends) this model holds: all of them, or one pipeline stage's.
    stage: StageSpec,
    /// The word embeddings (V, H), or this rank's rows of them (first stage).
    embedding: Option<Arc<dyn VocabTable>>,
    /// Layers `stage.layers`.
    layers: Vec<Block>,
    /// The final LayerNorm and the output head: the embedding table itself when tied, `lm_head`
    /// otherwise (last stage).
    ends: Option<(LayerNorm, Arc<dyn VocabTable>)>,
    rope: Rope,
    device: Device,
    dtype: DType,
}

impl Glm {
    /// Build from a VarBuilder whose paths are the checkpoint names (see `weights`).
    pub fn new(cfg: &Config, vb: VarBuilder, lin: &dyn LinearFactory) -> Result<Self> {
        Self::new_stage(cfg, vb, lin, &StageSpec::whole(cfg))
    }

    /// One pipeline stage of the model: its layers, the embedding on the first stage, the final
    /// LayerNorm and head on the last. `vb` needs only the stage's tensors.
    pub fn new_stage(cfg: &Config, vb: VarBuilder, lin: &dyn LinearFactory, stage: &StageSpec) -> Result<Self> {
        cfg.validate()?;
        if stage.layers.end > cfg.num_layers || stage.index >= stage.stages {
            return Err(Error::Config(format!("{stage} does not fit a model of {} layers", cfg.num_layers)));
        }
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let tf = vb.pp(TRANSFORMER);
        let layers =
            stage.layers.clone().map(|i| Block::new(cfg, tf.pp(LAYERS).pp(i), lin)).collect::<Result<Vec<_>>>()?;
        let tied = cfg.tie_word_embeddings;
        let embedding = if stage.is_first() || (stage.is_last() && tied) {
            Some(lin.vocab(&tf, WORD_EMBEDDINGS, v, h)?)
        } else {
            None
        };
        let ends = match (&embedding, stage.is_last()) {
            (_, false) => None,
            (Some(e), true) if tied => Some(e.clone()),
            _ => Some(lin.vocab(&vb, LM_HEAD, v, h)?),
        }
        .map(|head| Ok::<_, Error>((LayerNorm::load(tf.pp(FINAL_LAYERNORM), h, cfg.layernorm_eps)?, head)))
        .transpose()?;
        let dtype = embedding.as_ref().map_or(vb.dtype(), |e| e.weight().dtype());
        Ok(Self {
            cfg: cfg.clone(),
            stage: stage.clone(),
            embedding: if stage.is_first() { embedding } else { None },
            layers,
            ends,
            rope: match Rope::new(cfg.head_dim(), cfg.rope_parts(), cfg.rope_base, vb.device())? {
                rope if cfg.rope_f16_inv_freq => rope.with_f16_inv_freq()?,
                rope => rope,
            },
            device: vb.device().clone(),
            dtype,
        })
    }

    /// Check every tensor of the checkpoint against the parameter table (names and shapes, all
    /// reported with the file), then build.
    pub fn from_checkpoint(
        cfg: &Config,
        ckpt: &Checkpoint,
        dtype: DType,
        device: &Device,
        lin: &dyn LinearFactory,
    ) -> Result<Self> {
        cfg.validate()?;
        let tensors = ckpt.load_all(&tensor_specs(cfg), dtype, device)?;
        Self::new(cfg, VarBuilder::from_tensors(tensors, dtype, device), lin)
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The layers (and ends) this model holds.
    pub fn stage(&self) -> &StageSpec {
        &self.stage
    }

    fn embedding(&self) -> Result<&Arc<dyn VocabTable>> {
        self.embedding.as_ref().ok_or_else(|| Error::Input(format!("{} holds no word embeddings", self.stage)))
    }

    fn ends(&self) -> Result<&(LayerNorm, Arc<dyn VocabTable>)> {
        self.ends.as_ref().ok_or_else(|| Error::Input(format!("{} holds no output head", self.stage)))
    }

    /// Logits [B, T, V] for tokens `ids` [B, T] at `positions` ([B, T], or [B, 2, T] for 2-D RoPE),
    /// attending as `layout` says. With a cache, `ids` continue the cached tokens: they are row
    /// positions cache.len().. of the layout, and their keys and values are appended to the cache.
    pub fn forward(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        layout: &AttnLayout,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        self.run(StageInput::Ids(ids), positions, layout, cache, None, None)
    }

    /// `forward` with logits only at `rows` (indices into the flattened [B*T] positions): [N, V].
    /// Scoring reads a few positions of long rows, and the head is the largest product of a small
    /// model.
    pub fn forward_at(&self, ids: &Tensor, positions: &Tensor, layout: &AttnLayout, rows: &Tensor) -> Result<Tensor> {
        self.run(StageInput::Ids(ids), positions, layout, None, None, Some(rows))
    }

    /// The training forward: `forward` plus dropout and embedding gradient shrink, no cache. With
    /// `rows` (indices into the flattened [B*T] positions) only those rows get logits, [N, V]: the
    /// objective scores a fraction of the positions, and the head is the largest product of a small
    /// model.
    pub fn forward_train(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        layout: &AttnLayout,
        train: &TrainOptions,
        rows: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.run(StageInput::Ids(ids), positions, layout, None, Some(train), rows)
    }

    /// One pipeline stage's part of `forward_train` (`train` given) or of `forward` without a
    /// cache: from the ids (first stage) or the previous stage's hidden states, through the
    /// stage's layers, to the hidden states (B, T, H) for the next stage, or on the last stage the
    /// logits ((N, V) at `rows`). Split over stages, the logits are the whole model's.
    pub fn forward_stage(
        &self,
        input: StageInput,
        positions: &Tensor,
        layout: &AttnLayout,
        train: Option<&TrainOptions>,
        rows: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.run(input, positions, layout, None, train, rows)
    }

    /// Next-token logits [S, V] after the last new token of each sequence of a ragged batch: the
    /// projections run once over every sequence's new tokens together (one pass over the weights
    /// for the whole batch), attention per sequence over its own cache. Each sequence's logits are
    /// those `forward` gives it alone.
    pub fn forward_sequences(&self, seqs: &mut [Sequence]) -> Result<Tensor> {
        if seqs.is_empty() {
            return Err(Error::Input("empty batch: no sequences".into()));
        }
        let (mut parts, mut ids, mut last) = (Vec::with_capacity(seqs.len()), Vec::new(), Vec::new());
        for (s, seq) in seqs.iter_mut().enumerate() {
            parts.push(self.sequence_part(s, seq, ids.len())?);
            ids.extend_from_slice(seq.ids);
            last.push((ids.len() - 1) as u32);
        }
        let dev = self.device();
        let x = self.embedding()?.embed(&Tensor::new(ids.as_slice(), dev)?)?.unsqueeze(0)?; // (1, T, H)
        let mut caches: Vec<Option<&mut KvCache>> = seqs.iter_mut().map(|s| Some(&mut *s.cache)).collect();
        let step = Step { rope: &self.rope, parts, train: None };
        self.stack(x, &step, &mut caches, Some(&Tensor::new(last, dev)?))
    }

    /// `forward_sequences` of one sequence, begun: its tokens embedded, no layer run yet.
    /// [`Glm::advance`] runs the layers.
    pub fn begin(&self, seq: &mut Sequence) -> Result<Partial> {
        let part = self.sequence_part(0, seq, 0)?;
        let x = self.embedding()?.embed(&Tensor::new(seq.ids, self.device())?)?.unsqueeze(0)?;
        Ok(Partial { x, part, next: self.stage.layers.start })
    }

    /// Runs up to `layers` (at least one) more layers of `p`, appending to the sequence's `cache`;
    /// once the last has run, the next-token logits [1, V] after its last token. On an error the
    /// cache holds some of the tokens in some layers: clear it.
    pub fn advance(&self, p: &mut Partial, cache: &mut KvCache, layers: usize) -> Result<Option<Tensor>> {
        let end = (p.next + layers.max(1)).min(self.stage.layers.end);
        let step = Step { rope: &self.rope, parts: vec![p.part.clone()], train: None };
        p.x = self.layers_between(p.x.clone(), &step, &mut [Some(cache)], p.next..end)?;
        p.next = end;
        if end < self.stage.layers.end {
            return Ok(None);
        }
        let last = Tensor::new(&[(p.part.len - 1) as u32], self.device())?;
        Ok(Some(self.head(&p.x, Some(&last))?))
    }

    /// Checks sequence `s` of a ragged batch; its part, at token `start` of the input.
    fn sequence_part(&self, s: usize, seq: &mut Sequence, start: usize) -> Result<Part> {
        let (t, parts_per_token) = (seq.ids.len(), self.cfg.rope_parts());
        let bad = |what: String| Error::Input(format!("sequence {s} of the batch: {what}"));
        if t == 0 || seq.positions.len() != parts_per_token * t || seq.layout.batch() != 1 {
            return Err(bad(format!(
                "{t} tokens, {} position ids ({parts_per_token} per token wanted) and a layout of {} rows (1 wanted)",
                seq.positions.len(),
                seq.layout.batch()
            )));
        }
        if let Some(id) = seq.ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            return Err(bad(format!("token id {id} is outside the vocabulary (size {})", self.cfg.vocab_size)));
        }
        let past = seq.cache.prepare(&self.cfg, 1)?;
        let positions = Tensor::new(seq.positions, self.device())?.reshape((1, parts_per_token, t))?;
        let positions = if parts_per_token == 1 { positions.squeeze(1)? } else { positions };
        self.part(start, t, &positions, seq.layout, past)
    }

    fn run(
        &self,
        input: StageInput,
        positions: &Tensor,
        layout: &AttnLayout,
        mut cache: Option<&mut KvCache>,
        train: Option<&TrainOptions>,
        rows: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, t) = match input {
            StageInput::Ids(ids) => self.check_ids(ids)?,
            StageInput::Hidden(x) => match x.dims() {
                &[b, t, h] if h == self.cfg.hidden_size && t > 0 => (b, t),
                d => {
                    return Err(Error::Input(format!(
                        "{}: hidden states {d:?}, want [B, T, {}]",
                        self.stage, self.cfg.hidden_size
                    )))
                }
            },
        };
        self.check_layout(b, t, positions, layout)?;
        let past = match cache.as_deref_mut() {
            Some(c) => c.prepare(&self.cfg, b)?,
            None => 0,
        };
        let step = Step { rope: &self.rope, parts: vec![self.part(0, t, positions, layout, past)?], train };
        let x = match input {
            StageInput::Ids(ids) => {
                let x = self.embedding()?.embed(&ids.flatten_all()?)?.reshape((b, t, ()))?; // (B, T, H)
                match train.map(|t| t.egs_alpha).filter(|a| *a != 1.0) {
                    // EGS: same value, gradient scaled by alpha.
                    Some(alpha) => ((&x * alpha)? + (x.detach() * (1.0 - alpha))?)?,
                    None => x,
                }
            }
            StageInput::Hidden(_) if self.stage.is_first() => {
                return Err(Error::Input(format!("{} starts from token ids, not hidden states", self.stage)))
            }
            StageInput::Hidden(x) => x.clone(),
        };
        let x = self.layers_between(x, &step, &mut [cache], self.stage.layers.clone())?;
        match self.ends {
            Some(_) => self.head(&x, rows),
            None => Ok(x),
        }
    }

    /// The rotary tables and mask of `len` tokens from `start` at `positions`, after `past` cached.
    fn part(&self, start: usize, len: usize, positions: &Tensor, layout: &AttnLayout, past: usize) -> Result<Part> {
        let (cos, sin) = self.rope.tables(positions, self.dtype())?;
        let scale = 1.0 / (self.cfg.head_dim() as f64).sqrt();
        let (cos_q, sin_q) = ((&cos * scale)?, (&sin * scale)?);
        let mask = layout.mask(past, len, past + len, self.device())?;
        Ok(Part { start, len, cos, sin, cos_q, sin_q, mask })
    }

    /// The layers, the final LayerNorm and the head over embeddings x (B, T, H): logits (B, T, V),
    /// or (N, V) at `rows` of the flattened positions.
    fn stack(
        &self,
        x: Tensor,
        step: &Step,
        caches: &mut [Option<&mut KvCache>],
        rows: Option<&Tensor>,
    ) -> Result<Tensor> {
        let x = self.layers_between(x, step, caches, self.stage.layers.clone())?;
        self.head(&x, rows)
    }

    /// Layers `layers` over x (B, T, H).
    fn layers_between(
        &self,
        mut x: Tensor,
        step: &Step,
        caches: &mut [Option<&mut KvCache>],
        layers: std::ops::Range<usize>,
    ) -> Result<Tensor> {
        for i in layers {
            let layer = i.checked_sub(self.stage.layers.start).and_then(|j| self.layers.get(j));
            let layer = layer.ok_or_else(|| Error::Input(format!("layer {i} is not on {}", self.stage)))?;
            let mut slots: Slots =
                caches.iter_mut().map(|c| c.as_deref_mut().and_then(|c| c.layers.get_mut(i))).collect();
            x = layer.forward(&x, step, i, &mut slots)?;
        }
        Ok(x)
    }

    /// Mean cross entropy (f32) of logits from this model against `targets` (`IGNORE_INDEX` skipped).
    /// Under tensor parallelism the logits are this rank's vocabulary columns and the loss is
    /// computed across ranks without gathering them.
    pub fn cross_entropy(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        Ok(self.ends()?.1.cross_entropy(logits, targets)?)
    }

    /// (start, end, total): the vocabulary columns of the logits this model returns.
    pub fn vocab_rows(&self) -> (usize, usize, usize) {
        let v = self.cfg.vocab_size;
        self.ends.as_ref().map_or((0, v, v), |(_, head)| head.rows())
    }

    /// The final LayerNorm and the head: logits (B, T, V), or (N, V) at `rows` of the flattened
    /// positions.
    fn head(&self, x: &Tensor, rows: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (final_layernorm, head) = self.ends()?;
        let mut out = final_layernorm.forward(x)?;
        if let Some(r) = rows {
            out = out.reshape((b * t, ()))?.index_select(r, 0)?; // (N, H)
        }
        Ok(head.logits(&out)?) // (B, T, V) or (N, V); V/tp columns under tensor parallelism
    }

    /// (B, T) of token ids, each inside the vocabulary.
    fn check_ids(&self, ids: &Tensor) -> Result<(usize, usize)> {
        let (b, t) =
            ids.dims2().map_err(|_| Error::Input(format!("token ids must be [B, T], got {:?}", ids.dims())))?;
        if t == 0 {
            return Err(Error::Input("empty input: no tokens".into()));
        }
        let host: Vec<i64> = ids.flatten_all()?.to_dtype(DType::I64)?.to_vec1()?;
        if let Some((i, &id)) = host.iter().enumerate().find(|(_, &id)| id < 0 || id as usize >= self.cfg.vocab_size) {
            return Err(Error::Input(format!(
                "token id {id} at row {}, column {} is outside the vocabulary (size {})",
                i / t,
                i % t,
                self.cfg.vocab_size
            )));
        }
        Ok((b, t))
    }

    fn check_layout(&self, b: usize, t: usize, positions: &Tensor, layout: &AttnLayout) -> Result<()> {
        let parts = self.cfg.rope_parts();
        let want: Vec<usize> = if parts == 1 { vec![b, t] } else { vec![b, parts, t] };
        if positions.dims() != want.as_slice() {
            return Err(Error::Input(format!(
                "position ids must be {want:?} for {:?}, got {:?}",
                self.cfg.position_encoding,
                positions.dims()
            )));
        }
        if layout.batch() != b {
            return Err(Error::Input(format!("attention layout has {} rows, input has {b}", layout.batch())));
        }
        Ok(())
    }
}
