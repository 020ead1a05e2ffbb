//! sluice: an admission-control reverse proxy for a fragile legacy HTTP backend.
//!
//! This crate is the only one that touches pingora. It holds the `ProxyHttp` service
//! ([`service`]), the async admission adapter around the pure policy of `sluice-plugins`
//! ([`admission`]), configuration ([`config`]), the command line ([`cli`]), the in-process
//! runner used by the demo and the end-to-end tests ([`run`]), and `sluice calibrate`, which
//! measures a backend's capacity ([`calibrate`]). With `[cluster]`, several instances share each
//! backend's cap through Redis leases ([`cluster`], over a minimal client, [`resp`]).

#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod admission;
pub mod body;
pub mod calibrate;
pub mod cli;
pub mod cluster;
pub mod compat;
pub mod config;
pub mod demo;
pub mod ghost;
pub mod handoff;
pub mod health;
pub mod idle;
pub mod logging;
pub mod metrics;
pub mod reclaim;
pub mod reload;
pub mod resp;
pub mod run;
pub mod service;
pub mod shared;
pub mod tls;
pub mod upstream_conns;

pub use admission::{Admission, Permit, Shed};
pub use config::{Config, ConfigError, LoadError, Overrides};
pub use run::{build_server, RunningProxy};
