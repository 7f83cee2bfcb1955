//! The data layer: JSONL records, the one record-to-ids rule ([`encode`]), training
//! examples and their seeded order ([`examples`]), and
//! stored teacher logits ([`teacher_logits`]).
pub mod align;
pub mod encode;
pub mod examples;
pub mod records;
pub mod shard;
pub mod teacher_logits;
pub mod topk_compact;
