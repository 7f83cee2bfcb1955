//! The training layer: loss functions ([`losses`]), AdamW and the learning-rate schedule
//! ([`optim`]), and the engine that runs distillation and fine-tuning ([`trainer`]).
pub mod cross;
pub mod logit_grad;
pub mod losses;
pub mod optim;
pub mod trainer;
