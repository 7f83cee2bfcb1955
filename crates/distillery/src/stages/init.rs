//! Building the student a distillation run starts from: a scaled-down teacher (fewer layers,
//! heads, hidden or FFN width) or another architecture sharing the tokenizer, initialised
//! randomly, from chosen teacher layers (DistilBERT), or by structured pruning (Minitron).
use crate::model::arch::{ParamRole, WeightLayout};
use crate::model::causal_lm::{CausalLm, ForwardObserver, InitMode};
use crate::model::config::ModelConfig;
use crate::base::io::{dir_bytes, files_bytes, write_json_atomic};
use crate::data::encode::{read_tokenized, Layout};
use crate::model::checkpoint::save_pretrained;
use crate::model::token_bytes::TokenBytes;
use crate::model::tokenizer::Tok;
use crate::model::ModelFiles;
use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use serde_json::json;
use std::collections::HashMap;
use std::path::PathBuf;
use tch::{Kind, Tensor};

/// Requested student shape; `None` keeps the teacher's value.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ShapeSpec {
    pub layers: Option<i64>,
    pub hidden: Option<i64>,
    pub heads: Option<i64>,
    pub kv_heads: Option<i64>,
    pub intermediate: Option<i64>,
}

/// The student's config: the teacher's with the requested shape. Refuses impossible shapes.
/// `keep_head_dim` (pruning) keeps the teacher's head width, decoupled from hidden/heads,
/// where the architecture allows an explicit `head_dim`.
pub fn scaled_config(teacher: &ModelConfig, spec: &ShapeSpec, keep_head_dim: bool) -> Result<ModelConfig> {
    let mut c = teacher.clone();
    if let Some(l) = spec.layers {
        ensure!(l >= 1, "--layers must be at least 1");
        ensure!(l <= teacher.num_layers, "--layers {l}: the teacher has only {} layers", teacher.num_layers);
        c.num_layers = l;
    }
    if let Some(h) = spec.hidden {
        ensure!(h >= 1, "--hidden must be positive");
        c.hidden_size = h;
    }
    if let Some(a) = spec.heads {
        ensure!(a >= 1, "--heads must be positive");
        c.num_heads = a;
        // Keep the teacher's grouping unless told otherwise, as far as it divides.
        if spec.kv_heads.is_none() {
            c.num_kv_heads = if a % teacher.num_kv_heads == 0 { teacher.num_kv_heads.min(a) } else { a };
        }
    }
    if let Some(k) = spec.kv_heads {
        ensure!(k >= 1, "--kv-heads must be positive");
        c.num_kv_heads = k;
    }
    if let Some(f) = spec.intermediate {
        ensure!(f >= 1, "--intermediate must be positive");
        c.intermediate_size = f;
    }
    let arch = teacher.spec();
    if arch.keys.kv_heads.is_none() {
        ensure!(
            spec.kv_heads.is_none() || spec.kv_heads == Some(c.num_heads),
            "{} has no grouped-query attention; drop --kv-heads",
            arch.model_type
        );
        c.num_kv_heads = c.num_heads;
    }
    if c.num_heads % c.num_kv_heads != 0 {
        bail!("--kv-heads {} does not divide the {} attention heads", c.num_kv_heads, c.num_heads);
    }
    let explicit_head_dim = arch.keys.head_dim.is_some();
    if keep_head_dim && explicit_head_dim {
        c.head_dim = teacher.head_dim;
    } else if spec.hidden.is_some() || spec.heads.is_some() {
        // The head width follows hidden/heads, unless the teacher decouples them (Qwen3's
        // explicit head_dim) and only the width changes.
        let decoupled = explicit_head_dim && teacher.head_dim * teacher.num_heads != teacher.hidden_size;
        if !(decoupled && spec.heads.is_none()) {
            if c.hidden_size % c.num_heads != 0 {
                bail!("{} heads do not divide the hidden width {}", c.num_heads, c.hidden_size);
            }
            c.head_dim = c.hidden_size / c.num_heads;
        }
    }
    c.validate()?;
    Ok(c)
}

/// Which teacher layer each student layer copies or imitates: `n` spread evenly over
/// `0..teacher_layers`, first and last included.
pub fn uniform_layer_map(n: usize, teacher_layers: usize) -> Vec<usize> {
    if n == 1 {
        return vec![teacher_layers - 1];
    }
    (0..n).map(|i| ((i * (teacher_layers - 1)) as f64 / (n - 1) as f64).round() as usize).collect()
}

/// Indices kept along each prunable axis of one layer, in teacher numbering.
#[derive(Clone, Debug)]
pub struct LayerKeep {
    pub q_heads: Vec<i64>,
    pub kv_heads: Vec<i64>,
    pub ffn: Vec<i64>,
}

/// Everything a width-pruned copy needs: kept hidden channels and per-student-layer keeps.
#[derive(Clone, Debug)]
pub struct Keep {
    pub hidden: Vec<i64>,
    pub layers: Vec<LayerKeep>,
}

fn head_rows(heads: &[i64], head_dim: i64) -> Vec<i64> {
    heads.iter().flat_map(|&h| (h * head_dim)..((h + 1) * head_dim)).collect()
}

fn select(t: &Tensor, dim: i64, idx: &[i64]) -> Tensor {
    t.index_select(dim, &Tensor::from_slice(idx).to_device(t.device()))
}

/// The teacher tensor for one student parameter: layer index remapped, rows and columns
/// sliced to the kept heads, channels and hidden dimensions. What each dimension runs over
/// comes from the parameter's role in the architecture table, not from its name.
fn teacher_slice(name: &str, teacher: &HashMap<String, Tensor>, tcfg: &ModelConfig, layer_map: &[usize], keep: Option<&Keep>) -> Result<Tensor> {
    let spec = tcfg.spec();
    let prefix = spec.layer_prefix();
    let (tname, layer, block_param) = match name.strip_prefix(&prefix) {
        Some(rest) => {
            let (idx, tail) = rest.split_once('.').context("layer parameter without index")?;
            let i: usize = idx.parse()?;
            (format!("{prefix}{}.{tail}", layer_map[i]), Some(i), Some(tail))
        }
        None => (name.to_string(), None, None),
    };
    let t = teacher.get(&tname).with_context(|| format!("teacher has no tensor `{tname}`"))?;
    let Some(keep) = keep else { return Ok(t.shallow_clone()) };
    let hidden = &keep.hidden;
    let role = block_param.map_or(ParamRole::HiddenLast, |p| spec.param_role(p));
    let lk = layer.map(|i| &keep.layers[i]);
    let hd = tcfg.head_dim;
    // The kept indices along a projection's output and input sides.
    let (out_idx, in_idx): (Vec<i64>, Vec<i64>) = match (role, lk) {
        (ParamRole::HiddenLast, _) => return Ok(select(t, -1, hidden)),
        (ParamRole::PerHead, _) => return Ok(t.shallow_clone()),
        (ParamRole::Query, Some(k)) => (head_rows(&k.q_heads, hd), hidden.clone()),
        (ParamRole::KeyValue, Some(k)) => (head_rows(&k.kv_heads, hd), hidden.clone()),
        (ParamRole::FusedQkv, Some(k)) => {
            // [q | k | v] along the output: query rows, then kv rows offset past the queries.
            let q_width = tcfg.num_heads * hd;
            let kv_width = tcfg.num_kv_heads * hd;
            let kv = head_rows(&k.kv_heads, hd);
            let cols = head_rows(&k.q_heads, hd)
                .into_iter()
                .chain(kv.iter().map(|r| r + q_width))
                .chain(kv.iter().map(|r| r + q_width + kv_width))
                .collect();
            (cols, hidden.clone())
        }
        (ParamRole::MlpIn, Some(k)) => (k.ffn.clone(), hidden.clone()),
        (ParamRole::AttnOut, Some(k)) => (hidden.clone(), head_rows(&k.q_heads, hd)),
        (ParamRole::MlpOut, Some(k)) => (hidden.clone(), k.ffn.clone()),
        (_, None) => bail!("internal: `{name}` is a block parameter outside a layer"),
    };
    if !name.ends_with(".weight") {
        return Ok(select(t, 0, &out_idx)); // a bias runs over the output
    }
    // Linear weights are [out, in]; Conv1D weights [in, out].
    let (out_dim, in_dim) = match spec.layout {
        WeightLayout::Linear => (0, 1),
        WeightLayout::Conv1d => (1, 0),
    };
    Ok(select(&select(t, out_dim, &out_idx), in_dim, &in_idx))
}

/// Fills `student` from `teacher` through `layer_map` (and `keep` when pruning widths).
pub fn copy_from_teacher(student: &CausalLm, teacher: &CausalLm, layer_map: &[usize], keep: Option<&Keep>) -> Result<()> {
    let tvars = teacher.vs.variables();
    let svars = student.vs.variables();
    tch::no_grad(|| -> Result<()> {
        for (name, dst) in &svars {
            let src = teacher_slice(name, &tvars, &teacher.config, layer_map, keep)?;
            if src.size() != dst.size() {
                bail!("internal: `{name}` sliced to {:?}, student expects {:?}", src.size(), dst.size());
            }
            dst.shallow_clone().copy_(&src.to_kind(dst.kind()).to_device(dst.device()));
        }
        Ok(())
    })
}

/// Summed activation statistics of the teacher over calibration sequences.
pub struct Importance {
    pub heads: Vec<Vec<f64>>,
    pub ffn: Vec<Vec<f64>>,
    pub hidden: Vec<f64>,
    /// Mean `1 - cos(in, out)` per layer: how much each layer changes its input.
    pub block_influence: Vec<f64>,
}

impl Importance {
    /// Every score replaced by a seeded uniform draw (same shapes): pruning by chance.
    pub fn randomised(&self, seed: u64) -> Importance {
        let mut rng = crate::base::rng::SplitMix64::new(seed);
        let mut draw = |v: &[f64]| v.iter().map(|_| rng.next_f64()).collect::<Vec<f64>>();
        Importance {
            heads: self.heads.iter().map(|h| draw(h)).collect(),
            ffn: self.ffn.iter().map(|f| draw(f)).collect(),
            hidden: draw(&self.hidden),
            block_influence: draw(&self.block_influence),
        }
    }
}

/// Accumulates Minitron-style activation statistics as the teacher runs: per-head output
/// norms, per-channel |FFN activation|, per-hidden-channel |norm output|, and ShortGPT's
/// block influence `1 - cos(layer input, layer output)`, summed over tokens.
struct ImportanceObserver {
    heads: Vec<Tensor>,
    ffn: Vec<Tensor>,
    hidden: Tensor,
    block_influence: Vec<f64>,
}

impl ForwardObserver for ImportanceObserver {
    fn attention_heads(&mut self, layer: usize, out: &Tensor) {
        // out: [b, heads, t, head_dim] -> the L2 norm per head and token, summed: [heads]
        self.heads[layer] += out.to_kind(Kind::Float).norm_scalaropt_dim(2.0, [-1], false).sum_dim_intlist([0i64, 2].as_slice(), false, Kind::Float);
    }

    fn ffn_inner(&mut self, layer: usize, mid: &Tensor) {
        self.ffn[layer] += mid.to_kind(Kind::Float).abs().sum_dim_intlist([0i64, 1].as_slice(), false, Kind::Float);
    }

    fn layer(&mut self, layer: usize, input: &Tensor, normed: [&Tensor; 2], output: &Tensor) {
        for n in normed {
            self.hidden += n.to_kind(Kind::Float).abs().sum_dim_intlist([0i64, 1].as_slice(), false, Kind::Float);
        }
        let cos = Tensor::cosine_similarity(&input.to_kind(Kind::Float), &output.to_kind(Kind::Float), -1, 1e-8);
        self.block_influence[layer] += cos.neg().g_add_scalar(1.0).sum(Kind::Double).double_value(&[]);
    }
}

/// Runs the teacher over the calibration sequences one at a time (no padding to mask).
pub fn measure_importance(teacher: &CausalLm, seqs: &[Vec<i64>]) -> Result<Importance> {
    ensure!(!seqs.is_empty(), "no calibration sequences");
    let n = teacher.num_layers();
    let device = teacher.device();
    let cfg = &teacher.config;
    let zeros = |k: i64| Tensor::zeros([k], (Kind::Float, device));
    let mut obs = ImportanceObserver {
        heads: (0..n).map(|_| zeros(cfg.num_heads)).collect(),
        ffn: (0..n).map(|_| zeros(cfg.intermediate_size)).collect(),
        hidden: zeros(cfg.hidden_size),
        block_influence: vec![0.0; n],
    };
    let mut tokens = 0i64;
    tch::no_grad(|| -> Result<()> {
        for s in seqs.iter().filter(|s| !s.is_empty()) {
            let ids = Tensor::from_slice(s).unsqueeze(0).to_device(device);
            teacher.forward_observed(&ids, None, &mut obs)?;
            tokens += s.len() as i64;
        }
        Ok(())
    })?;
    let to_vec = |t: &Tensor| Vec::<f64>::try_from(t.to_kind(Kind::Double).to_device(tch::Device::Cpu)).unwrap();
    Ok(Importance {
        heads: obs.heads.iter().map(to_vec).collect(),
        ffn: obs.ffn.iter().map(to_vec).collect(),
        hidden: to_vec(&obs.hidden),
        block_influence: obs.block_influence.iter().map(|b| b / tokens.max(1) as f64).collect(),
    })
}

/// Indices of the `k` largest scores, returned in ascending index order (so that kept
/// units stay in their original order).
pub fn top_k_sorted(scores: &[f64], k: usize) -> Vec<i64> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut kept: Vec<i64> = idx.into_iter().take(k).map(|i| i as i64).collect();
    kept.sort();
    kept
}

/// Chooses what a pruned student keeps: the layers that change their input most, then per
/// kept layer the most important kv groups (by the summed importance of their query heads),
/// the most important query heads within each group, FFN channels and hidden channels.
pub fn choose_pruning(teacher: &ModelConfig, student: &ModelConfig, imp: &Importance) -> Result<(Vec<usize>, Keep)> {
    ensure!(
        student.head_dim == teacher.head_dim,
        "pruning keeps whole heads, so the head width must stay {} (got {}); choose --hidden/--heads accordingly",
        teacher.head_dim,
        student.head_dim
    );
    ensure!(student.num_kv_heads <= teacher.num_kv_heads, "pruning cannot add kv heads");
    ensure!(student.num_heads <= teacher.num_heads, "pruning cannot add heads");
    ensure!(student.hidden_size <= teacher.hidden_size, "pruning cannot widen the hidden size");
    ensure!(student.intermediate_size <= teacher.intermediate_size, "pruning cannot widen the FFN");
    let layer_ids = top_k_sorted(&imp.block_influence, student.num_layers as usize);
    let layer_map: Vec<usize> = layer_ids.iter().map(|&i| i as usize).collect();
    let t_group = teacher.kv_groups();
    let s_group = student.kv_groups();
    ensure!(
        s_group <= t_group,
        "pruning keeps the query heads of whole kv groups: {} heads per kv head is more than the teacher's {}",
        s_group,
        t_group
    );
    let layers = layer_map
        .iter()
        .map(|&l| {
            let hs = &imp.heads[l];
            let group_score: Vec<f64> =
                (0..teacher.num_kv_heads).map(|g| (0..t_group).map(|j| hs[(g * t_group + j) as usize]).sum()).collect();
            let kv_heads = top_k_sorted(&group_score, student.num_kv_heads as usize);
            let mut q_heads = vec![];
            for &g in &kv_heads {
                let within: Vec<f64> = (0..t_group).map(|j| hs[(g * t_group + j) as usize]).collect();
                q_heads.extend(top_k_sorted(&within, s_group as usize).into_iter().map(|j| g * t_group + j));
            }
            LayerKeep { q_heads, kv_heads, ffn: top_k_sorted(&imp.ffn[l], student.intermediate_size as usize) }
        })
        .collect();
    let hidden = top_k_sorted(&imp.hidden, student.hidden_size as usize);
    Ok((layer_map, Keep { hidden, layers }))
}

/// How each token of a new vocabulary was given its embedding.
#[derive(Debug, Default, Serialize)]
pub struct VocabTransfer {
    pub tokens: usize,
    /// Spelled by exactly one teacher token (or the same special token).
    pub exact: usize,
    /// The mean of several teacher tokens' rows.
    pub composed: usize,
    /// Nothing maps (or no teacher rows fit the student's width): a random row.
    pub random: usize,
    pub embedding_params_before: i64,
    pub embedding_params_after: i64,
}

/// The teacher tokens each token of `new` decomposes into: a special token is found by its
/// text; any other token's text is tokenized by the teacher (when it is valid UTF-8 and the
/// teacher spells it back exactly), else split greedily into the longest teacher pieces.
/// Empty where nothing maps.
pub fn decompose_vocabulary(new: &Tok, teacher: &Tok) -> Result<Vec<Vec<i64>>> {
    let (nb, tb) = (TokenBytes::of(new)?, TokenBytes::of(teacher)?);
    let by_bytes = tb.ids_by_bytes(false);
    let longest = by_bytes.keys().map(|k| k.len()).max().unwrap_or(0);
    let greedy = |piece: &[u8]| -> Vec<i64> {
        let (mut at, mut out) = (0, vec![]);
        while at < piece.len() {
            let Some((l, id)) = (1..=longest.min(piece.len() - at)).rev().find_map(|l| by_bytes.get(&piece[at..at + l]).map(|&id| (l, id))) else {
                return vec![];
            };
            out.push(id);
            at += l;
        }
        out
    };
    (0..nb.len() as i64)
        .map(|id| {
            let piece = nb.piece(id);
            if nb.is_special(id) {
                return Ok(std::str::from_utf8(piece).ok().and_then(|s| teacher.token_to_id(s)).into_iter().collect());
            }
            if let Ok(text) = std::str::from_utf8(piece) {
                let ids = teacher.encode(text, false)?;
                if ids.iter().flat_map(|&t| tb.piece(t).iter().copied()).eq(piece.iter().copied()) && !ids.is_empty() {
                    return Ok(ids);
                }
            }
            Ok(greedy(piece))
        })
        .collect()
}

/// `student` (built over the teacher's vocabulary) moved onto the vocabulary of `new`: every
/// parameter is copied, except the embedding (and an untied output head), whose row for each
/// new token is the mean of the rows of the teacher tokens it decomposes into (random where
/// nothing maps). `rows_fit` is false when those rows are not the teacher's (a random
/// student of another width): then every row is random.
fn with_vocabulary(
    student: CausalLm,
    rows_from: Option<&HashMap<String, Tensor>>,
    teacher_tok: &Tok,
    new: &Tok,
    seed: i64,
) -> Result<(CausalLm, VocabTransfer)> {
    let rows_fit = rows_from.is_some();
    let parts = decompose_vocabulary(new, teacher_tok)?;
    let mut cfg = student.config.clone();
    let n = new.vocab_size() as i64;
    cfg.vocab_size = n;
    // Special ids follow their text into the new vocabulary.
    let moved = |id: Option<i64>| id.and_then(|i| teacher_tok.inner().id_to_token(i as u32)).and_then(|t| new.token_to_id(&t));
    cfg.bos_token_id = moved(cfg.bos_token_id);
    cfg.pad_token_id = moved(cfg.pad_token_id);
    cfg.eos_token_ids = cfg.eos_token_ids.iter().filter_map(|&e| moved(Some(e))).collect();
    if let Some(raw) = cfg.raw.as_object_mut() {
        raw.insert("bos_token_id".into(), json!(cfg.bos_token_id));
        raw.insert("pad_token_id".into(), json!(cfg.pad_token_id));
        raw.insert("eos_token_id".into(), match cfg.eos_token_ids.as_slice() { [one] => json!(one), many => json!(many) });
    }
    tch::manual_seed(seed);
    let out = CausalLm::new(cfg, student.device(), student.kind(), InitMode::Random);
    let old: HashMap<String, Tensor> = student.vs.variables().into_iter().collect();
    let mut t = VocabTransfer { tokens: parts.len(), ..Default::default() };
    let mapped: Vec<bool> = parts.iter().map(|p| rows_fit && !p.is_empty()).collect();
    for p in &parts {
        match p.len() {
            _ if !rows_fit => t.random += 1,
            0 => t.random += 1,
            1 => t.exact += 1,
            _ => t.composed += 1,
        }
    }
    let flat: Vec<i64> = parts.iter().flatten().copied().collect();
    let segment: Vec<i64> = parts.iter().enumerate().flat_map(|(i, p)| std::iter::repeat_n(i as i64, p.len())).collect();
    let counts: Vec<f32> = parts.iter().map(|p| p.len().max(1) as f32).collect();
    tch::no_grad(|| -> Result<()> {
        let embed = format!("{}.weight", out.config.spec().embed);
        for (name, mut p) in out.vs.variables() {
            let src = old.get(&name).with_context(|| format!("parameter {name} missing from the student"))?;
            if !(name == "lm_head.weight" || name.ends_with(&embed)) {
                p.copy_(src);
                continue;
            }
            // A vocabulary-sized matrix: embedding or untied head.
            t.embedding_params_before += src.numel() as i64;
            t.embedding_params_after += p.numel() as i64;
            let Some(src) = rows_from.and_then(|m| m.get(&name)).filter(|_| !flat.is_empty()) else {
                continue;
            };
            let dev = p.device();
            let rows = src.to_kind(Kind::Float).index_select(0, &Tensor::from_slice(&flat).to_device(dev));
            let sums = Tensor::zeros([n, src.size()[1]], (Kind::Float, dev)).index_add(0, &Tensor::from_slice(&segment).to_device(dev), &rows);
            let mean = sums / Tensor::from_slice(&counts).to_device(dev).unsqueeze(1);
            let keep = Tensor::from_slice(&mapped).to_device(dev).unsqueeze(1);
            let merged = mean.to_kind(p.kind()).where_self(&keep, &p);
            p.copy_(&merged);
        }
        Ok(())
    })?;
    Ok((out, t))
}

/// Builds a randomly initialised model (transformers-style init), seeded.
pub fn random_student(cfg: ModelConfig, teacher: &CausalLm, seed: i64) -> CausalLm {
    tch::manual_seed(seed);
    CausalLm::new(cfg, teacher.device(), teacher.kind(), InitMode::Random)
}

/// How a student's weights start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitMethod {
    /// transformers-style random initialisation (seeded).
    Random,
    /// Copy chosen teacher layers, embeddings, final norm and head (DistilBERT).
    CopyLayers,
    /// Minitron-style structured pruning from activation importance on calibration records.
    Prune,
}

impl InitMethod {
    pub fn name(self) -> &'static str {
        match self {
            InitMethod::Random => "random",
            InitMethod::CopyLayers => "copy-layers",
            InitMethod::Prune => "prune",
        }
    }
}

impl std::str::FromStr for InitMethod {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<InitMethod> {
        [InitMethod::Random, InitMethod::CopyLayers, InitMethod::Prune]
            .into_iter()
            .find(|m| m.name() == s)
            .with_context(|| format!("unknown init `{s}` (random, copy-layers, prune)"))
    }
}

impl std::fmt::Display for InitMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Everything kd-init needs.
pub struct InitOptions {
    /// Teacher model; `None` only with `config` and `tokenizer` (a model from scratch).
    pub teacher: Option<String>,
    /// Directory whose tokenizer files a model from scratch gets.
    pub tokenizer: Option<PathBuf>,
    pub out: PathBuf,
    pub init: InitMethod,
    pub shape: ShapeSpec,
    /// A config.json of another supported architecture (random init only).
    pub config: Option<PathBuf>,
    pub keep_layers: Option<Vec<usize>>,
    pub calib: Option<PathBuf>,
    pub calib_limit: usize,
    pub calib_max_length: usize,
    pub seed: i64,
    pub device: tch::Device,
    /// Precision of the saved student.
    pub kind: tch::Kind,
    /// Replace every importance score by a seeded random number: the ablation that says how
    /// much the activation statistics are worth.
    pub random_importance: bool,
}

/// A randomly initialised model from --config, with the tokenizer of --tokenizer.
fn from_scratch(args: &InitOptions) -> Result<String> {
    let (device, kind) = (args.device, args.kind);
    let (Some(config), Some(tok_dir)) = (&args.config, &args.tokenizer) else {
        bail!("--teacher is required (without one, give --config and --tokenizer to build a model from scratch)");
    };
    ensure!(args.init == InitMethod::Random, "without a teacher only --init random is possible");
    let cfg = ModelConfig::from_file(config)?;
    let side_files: Vec<PathBuf> = crate::model::checkpoint::SIDE_FILES
        .iter()
        .map(|f| tok_dir.join(f))
        .filter(|p| p.is_file())
        .collect();
    let files = ModelFiles { name: tok_dir.display().to_string(), config: config.clone(), weights: vec![], side_files };
    let tok = Tok::load(&files)?;
    ensure!(
        tok.vocab_size() as i64 <= cfg.vocab_size,
        "{}: the tokenizer has {} tokens, more than the config's vocab_size {}",
        config.display(),
        tok.vocab_size(),
        cfg.vocab_size
    );
    tch::manual_seed(args.seed);
    let model = CausalLm::new(cfg, device, kind, InitMode::Random);
    let report = json!({"init": "random", "teacher": null, "seed": args.seed, "config": config.display().to_string(),
                        "student_params": model.param_count(), "layer_map": []});
    save_pretrained(&model, &args.out, Some(&files), &[("distillery_init.json", &report)])?;
    Ok(format!("model {} params -> {}", model.param_count(), args.out.display()))
}

/// The files a student with its own tokenizer gets: those of `dir` (kd-tokenizer output),
/// and nothing of the teacher's (its generation config names the teacher's token ids).
fn tokenizer_files(dir: &std::path::Path, teacher: &ModelFiles) -> ModelFiles {
    let side_files = crate::model::checkpoint::SIDE_FILES.iter().map(|f| dir.join(f)).filter(|p| p.is_file()).collect();
    ModelFiles { name: dir.display().to_string(), config: teacher.config.clone(), weights: vec![], side_files }
}

/// Builds, saves and reports the student; returns the summary line.
pub fn run(args: &InitOptions) -> Result<String> {
    let shape = args.shape.clone();
    // Cheap checks before loading anything.
    if args.init == InitMethod::Prune && args.calib.is_none() {
        bail!("--init prune needs --calib FILE.jsonl (records to measure importance on)");
    }
    if args.config.is_some() && args.init != InitMethod::Random {
        bail!("--config builds a different architecture, which only --init random supports");
    }
    if args.out.join("model.safetensors").exists() {
        bail!("{} already holds a checkpoint; choose another --out or remove it", args.out.display());
    }
    let (device, kind) = (args.device, args.kind);
    let Some(teacher_spec) = args.teacher.clone() else {
        return from_scratch(args);
    };
    let (teacher, files, tok) = crate::model::load(&teacher_spec, device, kind)?;
    let tcfg = &teacher.config;
    let cfg = match &args.config {
        Some(path) => {
            let c = ModelConfig::from_file(path)?;
            ensure!(
                c.vocab_size == tcfg.vocab_size || args.tokenizer.is_some(),
                "{}: vocab_size {} differs from the teacher's {}; the student must share the teacher's tokenizer",
                path.display(),
                c.vocab_size,
                tcfg.vocab_size
            );
            c
        }
        None => scaled_config(tcfg, &shape, args.init == InitMethod::Prune)?,
    };
    let n_student = cfg.num_layers as usize;
    let n_teacher = tcfg.num_layers as usize;
    let same_widths = cfg.hidden_size == tcfg.hidden_size
        && cfg.num_heads == tcfg.num_heads
        && cfg.num_kv_heads == tcfg.num_kv_heads
        && cfg.intermediate_size == tcfg.intermediate_size
        && cfg.head_dim == tcfg.head_dim;
    let (student, layer_map) = match args.init {
        InitMethod::Random => {
            let map = uniform_layer_map(n_student.min(n_teacher), n_teacher);
            (random_student(cfg, &teacher, args.seed), map)
        }
        InitMethod::CopyLayers => {
            ensure!(same_widths, "--init copy-layers copies whole layers, so widths must match the teacher's; use --init prune to shrink widths");
            let map = match &args.keep_layers {
                Some(k) => {
                    ensure!(k.len() == n_student || args.shape.layers.is_none(), "--keep-layers lists {} layers but --layers is {n_student}", k.len());
                    ensure!(k.iter().all(|&i| i < n_teacher), "--keep-layers: the teacher has layers 0..{}", n_teacher - 1);
                    ensure!(k.windows(2).all(|w| w[0] < w[1]), "--keep-layers must be strictly increasing");
                    k.clone()
                }
                None => uniform_layer_map(n_student, n_teacher),
            };
            let mut cfg = cfg;
            cfg.num_layers = map.len() as i64;
            let student = CausalLm::new(cfg, device, kind, InitMode::ForLoading);
            copy_from_teacher(&student, &teacher, &map, None)?;
            (student, map)
        }
        InitMethod::Prune => {
            let calib = args.calib.as_ref().unwrap();
            let (_, toks) = read_tokenized(calib, &tok, Layout::Whole, Some(args.calib_max_length))?;
            let seqs: Vec<Vec<i64>> = toks.into_iter().take(args.calib_limit).map(|t| t.ids).collect();
            let mut imp = measure_importance(&teacher, &seqs).context("measuring importance")?;
            if args.random_importance {
                imp = imp.randomised(args.seed as u64);
            }
            let (map, keep) = choose_pruning(tcfg, &cfg, &imp)?;
            let student = CausalLm::new(cfg, device, kind, InitMode::ForLoading);
            copy_from_teacher(&student, &teacher, &map, Some(&keep))?;
            (student, map)
        }
    };
    // A vocabulary of the student's own (kd-tokenizer): embeddings composed from the
    // teacher's rows (a pruned or copied student's own rows, whose widths fit).
    let (student, vocab, save_files) = match &args.tokenizer {
        Some(dir) => {
            let new_files = tokenizer_files(dir, &files);
            let new_tok = Tok::load(&new_files)?;
            let own: HashMap<String, Tensor> = student.vs.variables().into_iter().collect();
            let teachers: HashMap<String, Tensor> = teacher.vs.variables().into_iter().collect();
            let rows_from = match args.init {
                InitMethod::Random if student.config.hidden_size == tcfg.hidden_size && args.config.is_none() => Some(&teachers),
                InitMethod::Random => None,
                _ => Some(&own),
            };
            let (s, t) = with_vocabulary(student, rows_from, &tok, &new_tok, args.seed)?;
            (s, Some(t), new_files)
        }
        None => (student, None, files.clone()),
    };
    let t_params = teacher.param_count();
    let s_params = student.param_count();
    let bytes = |m: &CausalLm| m.param_count() * m.kind().elt_size_in_bytes() as i64;
    let report = json!({
        "init": args.init.to_string(),
        "random_importance": args.random_importance,
        "teacher": teacher_spec,
        "seed": args.seed,
        "shape": shape,
        "model_type": student.config.arch.model_type(),
        "teacher_params": t_params,
        "student_params": s_params,
        "teacher_weight_bytes": bytes(&teacher),
        "student_weight_bytes": bytes(&student),
        "compression_ratio": t_params as f64 / s_params as f64,
        "layer_map": layer_map,
        "vocabulary": vocab,
    });
    save_pretrained(&student, &args.out, Some(&save_files), &[])?;
    // Sizes on disk are known only once written; the report goes in last.
    let on_disk = dir_bytes(&args.out);
    let teacher_disk = files_bytes(&files.weights);
    let mut report = report;
    report["student_weights_bytes_on_disk"] = json!(std::fs::metadata(args.out.join("model.safetensors"))?.len());
    report["student_dir_bytes_on_disk"] = json!(on_disk);
    report["teacher_weights_bytes_on_disk"] = json!(teacher_disk);
    write_json_atomic(&args.out.join("distillery_init.json"), &report)?;
    Ok(format!(
        "student {} params ({} bytes on disk), teacher {} params: {:.2}x smaller; layer map {:?} -> {}",
        s_params,
        on_disk,
        t_params,
        t_params as f64 / s_params as f64,
        layer_map,
        args.out.display()
    ))
}
