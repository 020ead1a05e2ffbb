//! `sluice demo`: a surge of POS terminals against an emulated legacy server.
use clap::Args;

/// `sluice demo`
#[derive(Debug, Args)]
pub struct DemoArgs {}
