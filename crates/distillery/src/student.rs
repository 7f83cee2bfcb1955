//! Building the student a distillation run starts from: a scaled-down teacher (fewer layers,
//! heads, hidden or FFN width) or another architecture sharing the tokenizer, initialised
//! randomly, from chosen teacher layers (DistilBERT), or by structured pruning (Minitron).
use crate::config::{Arch, ModelConfig};
use crate::model::{Capture, CausalLm, InitMode};
use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use std::collections::HashMap;
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
    if teacher.arch == Arch::Gpt2 {
        ensure!(spec.kv_heads.is_none() || spec.kv_heads == Some(c.num_heads), "gpt2 has no grouped-query attention; drop --kv-heads");
        c.num_kv_heads = c.num_heads;
    }
    if c.num_heads % c.num_kv_heads != 0 {
        bail!("--kv-heads {} does not divide the {} attention heads", c.num_kv_heads, c.num_heads);
    }
    if keep_head_dim && teacher.arch != Arch::Gpt2 {
        c.head_dim = teacher.head_dim;
    } else if spec.hidden.is_some() || spec.heads.is_some() {
        // The head width follows hidden/heads, unless the teacher decouples them (Qwen3's
        // explicit head_dim) and only the width changes.
        let decoupled = teacher.arch != Arch::Gpt2 && teacher.head_dim * teacher.num_heads != teacher.hidden_size;
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
/// sliced to the kept heads, channels and hidden dimensions.
fn teacher_slice(
    name: &str,
    teacher: &HashMap<String, Tensor>,
    tcfg: &ModelConfig,
    layer_map: &[usize],
    keep: Option<&Keep>,
) -> Result<Tensor> {
    let layers_prefix = if tcfg.arch == Arch::Gpt2 { "transformer.h." } else { "model.layers." };
    let (tname, layer) = match name.strip_prefix(layers_prefix) {
        Some(rest) => {
            let (idx, tail) = rest.split_once('.').context("layer parameter without index")?;
            let i: usize = idx.parse()?;
            (format!("{layers_prefix}{}.{tail}", layer_map[i]), Some(i))
        }
        None => (name.to_string(), None),
    };
    let t = teacher.get(&tname).with_context(|| format!("teacher has no tensor `{tname}`"))?;
    let Some(keep) = keep else { return Ok(t.shallow_clone()) };
    let h = &keep.hidden;
    let hd = tcfg.head_dim;
    let lk = layer.map(|i| &keep.layers[i]);
    let rows_q = lk.map(|k| head_rows(&k.q_heads, hd));
    let rows_kv = lk.map(|k| head_rows(&k.kv_heads, hd));
    let ffn = lk.map(|k| k.ffn.clone());
    let is_w = name.ends_with(".weight");
    let out = if tcfg.arch == Arch::Gpt2 {
        let big_h = tcfg.hidden_size;
        if name.contains(".attn.c_attn.") {
            let (q, kv) = (rows_q.unwrap(), rows_kv.unwrap());
            let cols: Vec<i64> = q
                .iter()
                .copied()
                .chain(kv.iter().map(|r| r + big_h))
                .chain(kv.iter().map(|r| r + 2 * big_h))
                .collect();
            let t = select(t, -1, &cols);
            if is_w { select(&t, 0, h) } else { t }
        } else if name.contains(".attn.c_proj.") {
            if is_w { select(&select(t, 0, &rows_q.unwrap()), 1, h) } else { select(t, 0, h) }
        } else if name.contains(".mlp.c_fc.") {
            let t = select(t, -1, &ffn.unwrap());
            if is_w { select(&t, 0, h) } else { t }
        } else if name.contains(".mlp.c_proj.") {
            if is_w { select(&select(t, 0, &ffn.unwrap()), 1, h) } else { select(t, 0, h) }
        } else {
            // wte, wpe: [n, hidden]; layer norms: [hidden]
            select(t, -1, h)
        }
    } else if name.contains("q_norm") || name.contains("k_norm") {
        t.shallow_clone()
    } else if name.contains(".q_proj.") {
        let t = select(t, 0, &rows_q.unwrap());
        if is_w { select(&t, 1, h) } else { t }
    } else if name.contains(".k_proj.") || name.contains(".v_proj.") {
        let t = select(t, 0, &rows_kv.unwrap());
        if is_w { select(&t, 1, h) } else { t }
    } else if name.contains(".o_proj.") {
        if is_w { select(&select(t, 1, &rows_q.unwrap()), 0, h) } else { select(t, 0, h) }
    } else if name.contains(".gate_proj.") || name.contains(".up_proj.") {
        let t = select(t, 0, &ffn.unwrap());
        if is_w { select(&t, 1, h) } else { t }
    } else if name.contains(".down_proj.") {
        if is_w { select(&select(t, 1, &ffn.unwrap()), 0, h) } else { select(t, 0, h) }
    } else {
        // embed_tokens, lm_head: [vocab, hidden]; norms: [hidden]
        select(t, -1, h)
    };
    Ok(out)
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

/// Runs the teacher over the calibration sequences one at a time (no padding to mask).
pub fn measure_importance(teacher: &CausalLm, seqs: &[Vec<i64>]) -> Result<Importance> {
    ensure!(!seqs.is_empty(), "no calibration sequences");
    let n = teacher.num_layers();
    let device = teacher.device();
    let cfg = &teacher.config;
    let zeros = |k: i64| Tensor::zeros([k], (Kind::Float, device));
    let mut heads: Vec<Tensor> = (0..n).map(|_| zeros(cfg.num_heads)).collect();
    let mut ffn: Vec<Tensor> = (0..n).map(|_| zeros(cfg.intermediate_size)).collect();
    let mut hidden = zeros(cfg.hidden_size);
    let mut bi = vec![0f64; n];
    let mut tokens = 0i64;
    tch::no_grad(|| {
        for s in seqs.iter().filter(|s| !s.is_empty()) {
            let ids = Tensor::from_slice(s).unsqueeze(0).to_device(device);
            let cap = Capture { importance: true, ..Default::default() };
            let out = teacher.forward_hidden(&ids, None, cap, None);
            for (i, l) in out.importance.into_iter().enumerate() {
                heads[i] += l.heads;
                ffn[i] += l.ffn;
                hidden += l.hidden;
                bi[i] += l.block_influence;
            }
            tokens += s.len() as i64;
        }
    });
    let to_vec = |t: &Tensor| Vec::<f64>::try_from(t.to_kind(Kind::Double).to_device(tch::Device::Cpu)).unwrap();
    Ok(Importance {
        heads: heads.iter().map(to_vec).collect(),
        ffn: ffn.iter().map(to_vec).collect(),
        hidden: to_vec(&hidden),
        block_influence: bi.iter().map(|b| b / tokens.max(1) as f64).collect(),
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

/// Builds a randomly initialised model (transformers-style init), seeded.
pub fn random_student(cfg: ModelConfig, teacher: &CausalLm, seed: i64) -> CausalLm {
    tch::manual_seed(seed);
    CausalLm::new(cfg, teacher.device(), teacher.kind(), InitMode::Random)
}
