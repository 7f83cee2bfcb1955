//! Hugging Face checkpoint directories: finding them (local or hub), loading weights with
//! strict name and shape checks, and saving in the layout `transformers` reads.
use crate::model::config::ModelConfig;
use crate::base::io::{atomic_dir, write_json_atomic};
use crate::model::causal_lm::{CausalLm, InitMode};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Tokenizer and generation files copied alongside the weights when a model is saved.
pub const SIDE_FILES: &[&str] =
    &["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja"];

/// The files of one checkpoint, wherever they came from.
#[derive(Clone, Debug)]
pub struct ModelFiles {
    /// What the user typed (a directory or a hub id), for messages and records.
    pub name: String,
    pub config: PathBuf,
    pub weights: Vec<PathBuf>,
    /// Optional files present next to the config (tokenizer, generation config, ...).
    pub side_files: Vec<PathBuf>,
}

impl ModelFiles {
    pub fn side_file(&self, name: &str) -> Option<&Path> {
        self.side_files.iter().find(|p| p.file_name().is_some_and(|f| f == name)).map(|p| p.as_path())
    }
}

fn shard_names(index_path: &Path) -> Result<Vec<String>> {
    let index: Value = serde_json::from_str(&std::fs::read_to_string(index_path)?)
        .with_context(|| format!("{}: invalid JSON", index_path.display()))?;
    let map = index
        .get("weight_map")
        .and_then(Value::as_object)
        .with_context(|| format!("{}: no `weight_map`", index_path.display()))?;
    let mut shards: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
    shards.sort();
    shards.dedup();
    Ok(shards)
}

/// Finds a model given as a local directory or a hub repo id. Hub downloads go through the
/// usual cache (`HF_HOME`); with `HF_HUB_OFFLINE=1` only the cache is consulted.
pub fn resolve(spec: &str) -> Result<ModelFiles> {
    let dir = Path::new(spec);
    if dir.is_dir() {
        return resolve_dir(spec, dir);
    }
    if dir.is_file() && dir.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        return resolve_gguf(spec, dir);
    }
    if dir.exists() {
        bail!("model `{spec}` is a file but not a .gguf; expected a checkpoint directory, a .gguf file or a hub id");
    }
    if !looks_like_hub_id(spec) {
        bail!("model directory `{spec}` does not exist (and `{spec}` is not a hub id, so the hub is not asked)");
    }
    resolve_hub(spec)
}

/// `name` or `owner/name` with the hub's characters (letters, digits, `-`, `_`, `.`; no
/// leading or doubled separators, at most 96 characters each). Anything else is a path that
/// does not exist, never a network request.
pub fn looks_like_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.len() <= 96
                && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                && p.starts_with(|c: char| c.is_ascii_alphanumeric())
                && !p.ends_with('.')
                && !p.contains("..")
                && !p.contains("--")
        })
}

/// `HF_HUB_OFFLINE` as huggingface_hub reads it (1, true, yes, on).
pub fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

fn resolve_dir(spec: &str, dir: &Path) -> Result<ModelFiles> {
    let config = dir.join("config.json");
    if !config.is_file() {
        bail!("{}: no config.json in this model directory", dir.display());
    }
    let weights = if dir.join("model.safetensors").is_file() {
        vec![dir.join("model.safetensors")]
    } else if dir.join("model.safetensors.index.json").is_file() {
        shard_names(&dir.join("model.safetensors.index.json"))?.into_iter().map(|s| dir.join(s)).collect()
    } else {
        bail!("{}: no model.safetensors or model.safetensors.index.json", dir.display());
    };
    for w in &weights {
        if !w.is_file() {
            bail!("{}: weight shard is missing", w.display());
        }
    }
    let side_files = SIDE_FILES.iter().map(|f| dir.join(f)).filter(|p| p.is_file()).collect();
    Ok(ModelFiles { name: spec.to_string(), config, weights, side_files })
}

fn resolve_hub(id: &str) -> Result<ModelFiles> {
    let offline = hub_offline();
    let get: Box<dyn Fn(&str) -> Option<PathBuf>> = if offline {
        let cache = hf_hub::Cache::from_env().model(id.to_string());
        Box::new(move |f| cache.get(f))
    } else {
        let token = std::env::var("HF_TOKEN").ok();
        let api = hf_hub::api::sync::ApiBuilder::from_env()
            .with_token(token)
            .build()
            .context("setting up the hub client")?;
        let repo = api.model(id.to_string());
        Box::new(move |f| repo.get(f).ok())
    };
    let where_ = if offline { "in the offline hub cache" } else { "on the hub" };
    let config = get("config.json")
        .with_context(|| format!("model `{id}`: not a local directory, and no config.json {where_}"))?;
    let weights = if let Some(w) = get("model.safetensors") {
        vec![w]
    } else if let Some(index) = get("model.safetensors.index.json") {
        let mut paths = vec![];
        for shard in shard_names(&index)? {
            paths.push(get(&shard).with_context(|| format!("model `{id}`: shard {shard} not found {where_}"))?);
        }
        paths
    } else {
        bail!("model `{id}`: no safetensors weights {where_}");
    };
    let side_files = SIDE_FILES.iter().filter_map(|f| get(f)).collect();
    Ok(ModelFiles { name: id.to_string(), config, weights, side_files })
}

/// Where the side files of GGUF models are kept: `$DISTILLERY_CACHE`, else
/// `$XDG_CACHE_HOME/distillery`, else `~/.cache/distillery`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("DISTILLERY_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("distillery")
}

/// A GGUF file as a checkpoint: its weights are read (and dequantised) from the file itself;
/// config.json and the tokenizer files, rebuilt from its metadata, are written once to a
/// cache folder named by the file's path, size and modification time.
fn resolve_gguf(spec: &str, path: &Path) -> Result<ModelFiles> {
    use std::hash::{Hash, Hasher};
    let g = crate::model::gguf::GgufFile::open(path)?;
    let meta = std::fs::metadata(path)?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (std::fs::canonicalize(path)?, meta.len(), meta.modified().ok()).hash(&mut h);
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let dir = cache_dir().join("gguf").join(format!("{stem}-{:016x}", h.finish()));
    if !dir.join("config.json").is_file() {
        let side = crate::model::gguf_hf::side_files(&g).with_context(|| format!("{}", path.display()))?;
        atomic_dir(&dir, |tmp| {
            write_json_atomic(&tmp.join("tokenizer.json"), &side.tokenizer)?;
            write_json_atomic(&tmp.join("tokenizer_config.json"), &side.tokenizer_config)?;
            write_json_atomic(&tmp.join("generation_config.json"), &side.generation_config)?;
            // config.json last: its presence marks a complete folder.
            write_json_atomic(&tmp.join("config.json"), &side.config)
        })?;
    }
    let side_files = SIDE_FILES.iter().map(|f| dir.join(f)).filter(|p| p.is_file()).collect();
    Ok(ModelFiles { name: spec.to_string(), config: dir.join("config.json"), weights: vec![path.to_path_buf()], side_files })
}

/// Checkpoint entries that are buffers, not parameters, in some writers' files.
fn is_ignorable(name: &str, cfg: &ModelConfig) -> bool {
    cfg.spec().is_buffer(name) || (cfg.tie_word_embeddings && name == "lm_head.weight")
}

/// Some checkpoints (old GPT-2 ones, bare base models) store the body without its prefix
/// (`transformer.`, `model.`).
fn canonical_name(name: &str, cfg: &ModelConfig) -> String {
    let body = cfg.spec().body;
    if !name.starts_with(&format!("{body}.")) && !name.starts_with("lm_head.") {
        format!("{body}.{name}")
    } else {
        name.to_string()
    }
}

/// The safetensors format's own header limit.
const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;

/// Checks a safetensors file's header against the file before anything is allocated from
/// it: the header length fits the file, every tensor has a known dtype, its shape's byte
/// size does not overflow and equals its data range, and that range lies inside the file.
pub fn check_safetensors(path: &Path) -> Result<()> {
    use std::io::Read;
    let name = path.display();
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {name}"))?;
    let size = f.metadata()?.len();
    if size < 8 {
        bail!("{name}: {size} bytes, too short for a safetensors file");
    }
    let mut len = [0u8; 8];
    f.read_exact(&mut len)?;
    let n = u64::from_le_bytes(len);
    if n > MAX_SAFETENSORS_HEADER || n > size - 8 {
        bail!("{name}: safetensors header of {n} bytes does not fit the file ({size} bytes) or the format's limit");
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)?;
    let v: Value = serde_json::from_slice(&header).with_context(|| format!("{name}: safetensors header is not valid JSON"))?;
    let obj = v.as_object().with_context(|| format!("{name}: safetensors header is not a JSON object"))?;
    let data = size - 8 - n;
    for (tensor, t) in obj.iter().filter(|(k, _)| *k != "__metadata__") {
        let dtype = t.get("dtype").and_then(Value::as_str).with_context(|| format!("{name}: tensor `{tensor}` has no dtype"))?;
        let width: u64 = match dtype {
            "F64" | "I64" | "U64" => 8,
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" | "U16" => 2,
            "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
            other => bail!("{name}: tensor `{tensor}` has unknown dtype `{other}`"),
        };
        let shape: Vec<u64> = t
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_u64).collect())
            .with_context(|| format!("{name}: tensor `{tensor}` has no valid shape"))?;
        let bytes = shape
            .iter()
            .try_fold(width, |acc, &d| acc.checked_mul(d))
            .with_context(|| format!("{name}: tensor `{tensor}` declares shape {shape:?}, whose size overflows"))?;
        let offsets: Vec<u64> = t
            .get("data_offsets")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_u64).collect())
            .filter(|o: &Vec<u64>| o.len() == 2)
            .with_context(|| format!("{name}: tensor `{tensor}` has no valid data_offsets"))?;
        if offsets[0] > offsets[1] || offsets[1] > data || offsets[1] - offsets[0] != bytes {
            bail!(
                "{name}: tensor `{tensor}` declares shape {shape:?} ({bytes} bytes of {dtype}) but data offsets {offsets:?} \
                 (the data section holds {data} bytes)"
            );
        }
    }
    Ok(())
}

/// Reads every tensor of a safetensors file after [`check_safetensors`].
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    check_safetensors(path)?;
    Tensor::read_safetensors(path).with_context(|| format!("reading {}", path.display()))
}

/// Reads every tensor of the checkpoint's shards.
pub fn read_tensors(files: &ModelFiles, cfg: &ModelConfig) -> Result<HashMap<String, Tensor>> {
    let mut all = HashMap::new();
    for path in &files.weights {
        if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
            let g = crate::model::gguf::GgufFile::open(path)?;
            all.extend(crate::model::gguf_hf::hf_tensors(&g, cfg)?);
            continue;
        }
        check_safetensors(path)?;
        let tensors = Tensor::read_safetensors(path).with_context(|| format!("reading {}", path.display()))?;
        for (name, t) in tensors {
            if is_ignorable(&name, cfg) {
                continue;
            }
            all.insert(canonical_name(&name, cfg), t);
        }
    }
    Ok(all)
}

/// Copies `tensors` into the model, failing on any missing, unexpected or misshapen tensor.
pub fn assign_weights(model: &CausalLm, mut tensors: HashMap<String, Tensor>, source: &str) -> Result<()> {
    let vars = model.vs.variables();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    let mut missing = vec![];
    for name in &names {
        if !tensors.contains_key(*name) {
            missing.push(name.as_str());
        }
    }
    if !missing.is_empty() {
        bail!("{source}: missing tensor(s): {}", missing.join(", "));
    }
    let mut unexpected: Vec<&String> = tensors.keys().filter(|k| !vars.contains_key(*k)).collect();
    unexpected.sort();
    if !unexpected.is_empty() {
        bail!(
            "{source}: unexpected tensor(s) for a {} model: {}",
            model.config.arch.model_type(),
            unexpected.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        );
    }
    tch::no_grad(|| -> Result<()> {
        for name in names {
            let src = tensors.remove(name).unwrap();
            let mut dst = vars[name].shallow_clone();
            if src.size() != dst.size() {
                bail!("{source}: tensor `{name}` has shape {:?}, the config implies {:?}", src.size(), dst.size());
            }
            dst.copy_(&src.to_kind(dst.kind()).to_device(dst.device()));
        }
        Ok(())
    })
}

/// Loads a model given as a directory or hub id.
pub fn load_model(spec: &str, device: Device, kind: Kind) -> Result<(CausalLm, ModelFiles)> {
    let files = resolve(spec)?;
    let config = ModelConfig::from_file(&files.config)?;
    let tensors = read_tensors(&files, &config)?;
    // The model is allocated from config.json: a config far larger than the weights (a
    // corrupt or hostile file) must fail here, not in a huge allocation.
    let held: i64 = tensors.values().map(|t| t.numel() as i64).sum();
    let declared = config.min_params();
    if declared > held as i128 {
        bail!("{}: config.json declares at least {declared} parameters, but the weights hold {held}", files.name);
    }
    let model = CausalLm::new(config, device, kind, InitMode::ForLoading);
    assign_weights(&model, tensors, &files.name)?;
    // The read copies are gone; their memory goes back to the OS rather than staying resident.
    crate::base::alloc::release_free_memory();
    Ok((model, files))
}

pub fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        _ => "float32",
    }
}

/// Writes `tensors` as one safetensors file with the `{"format": "pt"}` metadata that
/// `transformers` checks for.
pub fn write_safetensors(tensors: &[(String, Tensor)], path: &Path) -> Result<()> {
    use safetensors::tensor::Dtype;
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let (dtype, size) = match t.kind() {
            Kind::Float => (Dtype::F32, 4),
            Kind::BFloat16 => (Dtype::BF16, 2),
            Kind::Half => (Dtype::F16, 2),
            Kind::Int64 => (Dtype::I64, 8),
            Kind::Int => (Dtype::I32, 4),
            Kind::Double => (Dtype::F64, 8),
            k => bail!("cannot save tensor `{name}` of kind {k:?}"),
        };
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        views.push((name.clone(), TensorBytes { tensor: t.shallow_clone(), dtype, shape, len: t.numel() * size }));
    }
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    safetensors::tensor::serialize_to_file(views, &metadata, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A tensor as safetensors writes it: its bytes are copied out only when the writer reaches
/// it, so saving holds one tensor's bytes at a time rather than a second copy of them all (a
/// training state is three times the model).
struct TensorBytes {
    tensor: Tensor,
    dtype: safetensors::tensor::Dtype,
    shape: Vec<usize>,
    len: usize,
}

impl safetensors::tensor::View for TensorBytes {
    fn dtype(&self) -> safetensors::tensor::Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        if self.tensor.device() == Device::Cpu && self.tensor.is_contiguous() && self.len > 0 {
            // SAFETY: `self.tensor` keeps its storage alive for the borrow's lifetime, and the
            // `len` bytes from its data pointer are exactly its elements (contiguous, on the CPU);
            // nothing writes to it while the file is written.
            return std::borrow::Cow::Borrowed(unsafe { std::slice::from_raw_parts(self.tensor.data_ptr() as *const u8, self.len) });
        }
        let t = self.tensor.to_device(Device::Cpu).contiguous();
        let mut bytes = vec![0u8; self.len];
        t.copy_data_u8(&mut bytes, t.numel());
        std::borrow::Cow::Owned(bytes)
    }

    fn data_len(&self) -> usize {
        self.len
    }
}

/// Saves `model` as a Hugging Face checkpoint directory, atomically: `config.json`,
/// `model.safetensors`, `generation_config.json` and the tokenizer files from `tokenizer_from`.
/// `extra_json` adds named JSON files (reports) to the same atomic write. Files already in
/// `out` that are not replaced (e.g. training state) are kept.
pub fn save_pretrained(
    model: &CausalLm,
    out: &Path,
    tokenizer_from: Option<&ModelFiles>,
    extra_json: &[(&str, &Value)],
) -> Result<()> {
    let mut config = model.config.to_json();
    let dtype = kind_name(model.kind());
    config["torch_dtype"] = json!(dtype);
    if config.get("dtype").is_some() {
        config["dtype"] = json!(dtype);
    }
    let vars: BTreeMap<String, Tensor> = model.vs.variables().into_iter().collect();
    let tensors: Vec<(String, Tensor)> = vars.into_iter().collect();
    atomic_dir(out, |tmp| {
        write_json_atomic(&tmp.join("config.json"), &config)?;
        write_safetensors(&tensors, &tmp.join("model.safetensors"))?;
        for (name, value) in extra_json {
            write_json_atomic(&tmp.join(name), value)?;
        }
        if let Some(files) = tokenizer_from {
            for f in &files.side_files {
                std::fs::copy(f, tmp.join(f.file_name().unwrap()))
                    .with_context(|| format!("copying {}", f.display()))?;
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hub_shaped_names_go_to_the_hub() {
        for id in ["gpt2", "Qwen/Qwen3-1.7B", "meta-llama/Llama-3.2-1B", "a_b.c/d-e"] {
            assert!(looks_like_hub_id(id), "{id}");
        }
        for path in ["./model", "/abs/model", "runs/a/b", "a//b", "a/", "-x/y", "a/b..c", "x y", "a\\b", "", "a/b.", "a--b/c"] {
            assert!(!looks_like_hub_id(path), "{path}");
        }
    }
}
