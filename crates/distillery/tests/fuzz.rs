//! Hostile inputs: a seeded mutation fuzzer over every file format a stage reads (JSONL
//! records, safetensors weights, stored-logits sidecars, tokenizer.json, config.json, GGUF). Each
//! case flips, overwrites, inserts, deletes, duplicates or truncates bytes of a valid seed
//! file, then runs the real loader; every case must end in `Ok` or a clear `Err`, never a
//! panic, a hang or a huge allocation (peak memory is checked at the end).
//!
//! `DISTILLERY_FUZZ_CASES=N` sets the cases per format (default 1000, about 15 s; `make
//! fuzz` runs 50,000). The counts are printed (run with `--nocapture`) and recorded in
//! docs/RELIABILITY.md.
use distillery::base::rng::SplitMix64;
use distillery::data::records::read_jsonl_numbered;
use distillery::data::teacher_logits::{LogitsReader, TopRows};
use distillery::model::checkpoint::{load_model, save_pretrained, ModelFiles};
use distillery::model::gguf::GgufFile;
use distillery::model::gguf_hf::{hf_tensors, side_files, ExportType};
use distillery::stages::export::export;
use distillery::model::tokenizer::Tok;
use distillery::model::{CausalLm, InitMode};
use distillery::ModelConfig;
use serde_json::json;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("distillery-fuzz-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Byte strings that often break parsers: huge and negative numbers, deep nesting, NUL,
/// invalid UTF-8, a repeated key, a huge little-endian length.
const INTERESTING: &[&[u8]] = &[
    b"99999999999999999999999",
    b"-1",
    b"1e400",
    b"null",
    b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    b"\0",
    b"\xff\xfe\xc3\x28",
    b"\"id\":\"x\",\"id\":\"y\",",
    b"\xff\xff\xff\xff\xff\xff\xff\x7f",
    b"\"shape\":[4294967296,4294967296],",
    b"\n",
];

fn mutate(seed: &[u8], rng: &mut SplitMix64) -> Vec<u8> {
    let mut d = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let pos = |rng: &mut SplitMix64, d: &Vec<u8>| rng.below(d.len() + 1);
        match rng.below(9) {
            0 if !d.is_empty() => {
                let p = rng.below(d.len());
                d[p] ^= 1 << rng.below(8);
            }
            1 if !d.is_empty() => {
                let p = rng.below(d.len());
                d[p] = rng.next_u64() as u8;
            }
            2 => {
                let p = pos(rng, &d);
                d.truncate(p);
            }
            3 if !d.is_empty() => {
                let p = rng.below(d.len());
                let n = (1 + rng.below(16)).min(d.len() - p);
                d.drain(p..p + n);
            }
            4 => {
                let p = pos(rng, &d);
                let bytes: Vec<u8> = (0..1 + rng.below(16)).map(|_| rng.next_u64() as u8).collect();
                d.splice(p..p, bytes);
            }
            5 if !d.is_empty() => {
                let p = rng.below(d.len());
                let n = (1 + rng.below(64)).min(d.len() - p);
                let chunk = d[p..p + n].to_vec();
                let q = pos(rng, &d);
                d.splice(q..q, chunk);
            }
            6 => {
                let p = pos(rng, &d);
                let s = INTERESTING[rng.below(INTERESTING.len())];
                d.splice(p..p, s.iter().copied());
            }
            7 if !d.is_empty() => {
                // Overwrite rather than insert, so binary offsets stay put.
                let s = INTERESTING[rng.below(INTERESTING.len())];
                let p = rng.below(d.len());
                for (i, &b) in s.iter().enumerate().take(d.len() - p) {
                    d[p + i] = b;
                }
            }
            _ if d.len() >= 8 => {
                // A safetensors header length: zero, huge, or off by a little.
                let n = match rng.below(4) {
                    0 => 0u64,
                    1 => u64::MAX - rng.below(1000) as u64,
                    2 => d.len() as u64,
                    _ => u64::from_le_bytes(d[..8].try_into().unwrap()).wrapping_add(rng.below(17) as u64).wrapping_sub(8),
                };
                d[..8].copy_from_slice(&n.to_le_bytes());
            }
            _ => {}
        }
    }
    d
}

#[derive(Default)]
struct Counts {
    tried: usize,
    ok: usize,
    errors: usize,
    panics: Vec<String>,
}

static PANIC_MESSAGE: Mutex<Option<String>> = Mutex::new(None);

fn cases() -> usize {
    std::env::var("DISTILLERY_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000)
}

/// Runs `target` on `cases()` mutations of `seed` written to `path`.
fn campaign(format: &str, seed: &[u8], path: &Path, salt: u64, target: &dyn Fn(&Path) -> anyhow::Result<()>) -> Counts {
    std::panic::set_hook(Box::new(|info| {
        *PANIC_MESSAGE.lock().unwrap() = Some(info.to_string());
    }));
    let mut counts = Counts::default();
    let start = std::time::Instant::now();
    for case in 0..cases() {
        let mut rng = SplitMix64::for_key(0xF022 ^ salt, case as u64);
        let bytes = mutate(seed, &mut rng);
        std::fs::write(path, &bytes).unwrap();
        counts.tried += 1;
        match catch_unwind(AssertUnwindSafe(|| target(path))) {
            Ok(Ok(())) => counts.ok += 1,
            Ok(Err(e)) => {
                counts.errors += 1;
                assert!(!e.to_string().is_empty(), "{format} case {case}: an error without a message");
            }
            Err(_) => {
                let msg = PANIC_MESSAGE.lock().unwrap().take().unwrap_or_default();
                counts.panics.push(format!("case {case}: {msg}"));
            }
        }
    }
    let _ = std::panic::take_hook();
    println!(
        "fuzz {format:<12} {:>6} inputs: {:>6} loaded, {:>6} clear errors, {} panics ({:.1}s)",
        counts.tried,
        counts.ok,
        counts.errors,
        counts.panics.len(),
        start.elapsed().as_secs_f64()
    );
    counts
}

fn tiny_model(dir: &Path) -> CausalLm {
    let cfg = json!({"model_type": "llama", "vocab_size": 12, "hidden_size": 8, "intermediate_size": 12,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "max_position_embeddings": 32, "initializer_range": 0.2});
    tch::manual_seed(0);
    let model = CausalLm::new(ModelConfig::from_json(cfg).unwrap(), Device::Cpu, Kind::Float, InitMode::Random);
    save_pretrained(&model, dir, None, &[]).unwrap();
    model
}

const TOKENIZER: &str = r#"{"version":"1.0","truncation":null,"padding":null,
"added_tokens":[{"id":0,"content":"<s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],
"normalizer":null,"pre_tokenizer":{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true},
"post_processor":{"type":"TemplateProcessing","single":[{"SpecialToken":{"id":"<s>","type_id":0}},{"Sequence":{"id":"A","type_id":0}}],
"pair":[{"Sequence":{"id":"A","type_id":0}},{"Sequence":{"id":"B","type_id":1}}],"special_tokens":{"<s>":{"id":"<s>","ids":[0],"tokens":["<s>"]}}},
"decoder":{"type":"ByteLevel","add_prefix_space":true,"trim_offsets":true,"use_regex":true},
"model":{"type":"BPE","dropout":null,"unk_token":null,"continuing_subword_prefix":null,"end_of_word_suffix":null,
"fuse_unk":false,"byte_fallback":false,"ignore_merges":false,
"vocab":{"<s>":0,"a":1,"b":2,"c":3,"Ġ":4,"ab":5,"Ġa":6,"Ġab":7,"abc":8},"merges":["a b","Ġ a","Ġa b","ab c"]}}"#;

#[test]
fn mutated_inputs_end_in_clear_errors_never_panics() {
    let dir = scratch("campaign");
    let mut report = vec![];

    // JSONL records, with the fields stages read.
    let jsonl = concat!(
        r#"{"id": "a", "text": "In the beginning", "scores": {"x": 1.5}}"#, "\n",
        r#"{"id": "b", "prompt": "Q: 2+2?", "completion": " 4", "prompt_ids": [1, 2, 3], "completion_ids": [4]}"#, "\n",
        r#"{"id": "c", "prompt": "hi", "teacher_logits": {"file": "x", "row": 0, "rows": 2, "k": 4}, "nested": [[{"a": null}]]}"#, "\n",
    );
    report.push(campaign("jsonl", jsonl.as_bytes(), &dir.join("records.jsonl"), 1, &|p| {
        for (_, r) in read_jsonl_numbered(p)? {
            distillery::data::records::text_parts(&r)?;
            distillery::data::records::ids_field(&r, "prompt_ids")?;
        }
        Ok(())
    }));

    // Model weights (safetensors) and config.json, through the real loader.
    let model_dir = dir.join("model");
    tiny_model(&model_dir);
    let weights = std::fs::read(model_dir.join("model.safetensors")).unwrap();
    let config = std::fs::read(model_dir.join("config.json")).unwrap();
    let spec = model_dir.display().to_string();
    report.push(campaign("safetensors", &weights, &model_dir.join("model.safetensors"), 2, &|_| {
        load_model(&spec, Device::Cpu, Kind::Float).map(|_| ())
    }));
    std::fs::write(model_dir.join("model.safetensors"), &weights).unwrap();
    report.push(campaign("config.json", &config, &model_dir.join("config.json"), 3, &|_| {
        load_model(&spec, Device::Cpu, Kind::Float).map(|_| ())
    }));

    // A stored-logits sidecar, read whole and by record pointers.
    let rows = TopRows::from_logprobs(&Tensor::randn([6, 12], (Kind::Float, Device::Cpu)).log_softmax(-1, Kind::Float), 4);
    let sidecar = dir.join("t.jsonl.logits.safetensors");
    rows.write_to(&sidecar).unwrap();
    let seed = std::fs::read(&sidecar).unwrap();
    report.push(campaign("sidecar", &seed, &sidecar, 4, &|p| {
        TopRows::read(p)?;
        let mut reader = LogitsReader::with_file(p);
        for (row, n) in [(0, 2), (2, 4), (5, 1)] {
            let _rows = reader.rows(&json!({"row": row, "rows": n, "k": 4}))?;
        }
        Ok(())
    }));

    // tokenizer.json, loaded and used both ways.
    let tok_path = dir.join("tokenizer.json");
    let files = ModelFiles { name: "fuzz".into(), config: model_dir.join("config.json"), weights: vec![], side_files: vec![tok_path.clone()] };
    report.push(campaign("tokenizer", TOKENIZER.as_bytes(), &tok_path, 5, &|_| {
        let tok = Tok::load(&files)?;
        let ids = tok.encode("ab abc cab", true)?;
        tok.decode(&ids, false)?;
        Ok(())
    }));

    // GGUF, as kd-export writes it (F32 and Q8_0 tensors) and as a teacher argument reads it:
    // header, metadata, tensor table, the HF side files and every dequantised tensor.
    std::fs::write(model_dir.join("config.json"), &config).unwrap();
    std::fs::write(model_dir.join("tokenizer.json"), TOKENIZER).unwrap();
    let gguf_tok = dir.join("gguf-tok").join("tokenizer.json");
    std::fs::create_dir_all(gguf_tok.parent().unwrap()).unwrap();
    let gguf_files = ModelFiles { side_files: vec![gguf_tok.clone()], ..files.clone() };
    for (salt, ty) in [(6, ExportType::F32), (7, ExportType::Q8_0)] {
        let seed_path = dir.join(format!("seed-{ty:?}.gguf"));
        export(&spec, &seed_path, ty).unwrap();
        let seed = std::fs::read(&seed_path).unwrap();
        report.push(campaign(&format!("gguf-{ty:?}").to_lowercase(), &seed, &dir.join("m.gguf"), salt, &|p| {
            let g = GgufFile::open(p)?;
            let side = side_files(&g)?;
            let cfg = ModelConfig::from_json(side.config)?;
            hf_tensors(&g, &cfg)?;
            // The tokenizer it implies, as a stage would load and use it.
            std::fs::write(&gguf_tok, serde_json::to_vec(&side.tokenizer)?)?;
            let tok = Tok::load(&gguf_files)?;
            tok.decode(&tok.encode("ab abc cab", true)?, false)?;
            Ok(())
        }));
    }

    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let peak_mib = usage.ru_maxrss as f64 / 1024.0;
    println!("fuzz peak resident memory {peak_mib:.0} MiB");
    std::fs::remove_dir_all(&dir).unwrap();
    let panics: Vec<&String> = report.iter().flat_map(|c| &c.panics).collect();
    assert!(panics.is_empty(), "{} panics, first: {:?}", panics.len(), &panics[..panics.len().min(5)]);
    assert!(report.iter().all(|c| c.errors > c.tried / 10), "the mutations should break most inputs");
    assert!(peak_mib < 2048.0, "peak memory {peak_mib:.0} MiB: some input caused a huge allocation");
}

#[test]
fn hostile_records_get_errors_naming_file_and_line() {
    let dir = scratch("records");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("nul", b"{\"id\": \"a\", \"text\": \"x\"}\n{\"id\": \"b\", \"text\": \"x\0y\"}\n".to_vec(), "nul.jsonl:2: NUL byte at column"),
        ("utf8", b"{\"id\": \"a\", \"text\": \"caf\xc3\x28\"}\n".to_vec(), "utf8.jsonl:1: not valid UTF-8"),
        ("deep", format!("{{\"id\": \"a\", \"x\": {}{}}}\n", "[".repeat(200), "]".repeat(200)).into_bytes(), "deep.jsonl:1: malformed JSON"),
        ("dupkey", b"{\"id\": \"a\", \"text\": \"x\", \"id\": \"b\"}\n".to_vec(), "dupkey.jsonl:1: malformed JSON"),
        ("nested_dup", b"{\"id\": \"a\", \"scores\": {\"x\": 1, \"x\": 2}}\n".to_vec(), "duplicate key `x`"),
    ];
    for (name, bytes, want) in cases {
        let p = dir.join(format!("{name}.jsonl"));
        std::fs::write(&p, bytes).unwrap();
        let err = format!("{:#}", read_jsonl_numbered(&p).unwrap_err());
        assert!(err.contains(want), "{name}: {err}");
    }
    let deep = format!("{:#}", read_jsonl_numbered(&dir.join("deep.jsonl")).unwrap_err());
    assert!(deep.contains("recursion limit"), "{deep}");
    // A line over the cap fails before it is read whole.
    let p = dir.join("huge.jsonl");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(b"{\"id\": \"a\", \"text\": \"").unwrap();
        let block = vec![b'x'; 1 << 20];
        for _ in 0..(distillery::data::records::MAX_LINE_BYTES >> 20) + 1 {
            f.write_all(&block).unwrap();
        }
    }
    let err = format!("{:#}", read_jsonl_numbered(&p).unwrap_err());
    assert!(err.contains("huge.jsonl:1: line longer than 64 MiB"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
