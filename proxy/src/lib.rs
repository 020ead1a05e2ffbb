//! sluice: an admission-control reverse proxy for a fragile legacy HTTP backend.
//!
//! This crate is the only one that touches pingora. Its modules, by concern:
//! - the request: the `ProxyHttp` service, where each admitted request's [`service::exchange`]
//!   owns its backend slot ([`service`]), and the async admission adapter around the pure
//!   policy of `sluice-plugins` ([`admission`]);
//! - the client connection: sluice's own connection loop, with the client deadlines and caps
//!   ([`conn`]);
//! - the backend connection: sluice's dialer and its registry of connections ([`ghost`]);
//! - configuration ([`config`]) and the state the running parts share ([`shared`]), read on
//!   the request path through per-thread copies ([`snapshot`]);
//! - operations: the admin API, health checks, reload, the upgrade hand-over, and the budget
//!   several instances share through Redis ([`ops`]);
//! - observation: metrics, the access log, logging ([`observe`]);
//! - the command line ([`cli`]), the in-process runner used by the demo and the end-to-end tests
//!   ([`run`]), the demo backend ([`demo`]), and `sluice calibrate`, which measures a backend's
//!   capacity ([`calibrate`]);
//! - every read of pingora state that pingora does not expose through an API ([`compat`]).

#![forbid(unsafe_code)]

pub mod admission;
pub mod calibrate;
pub mod cli;
pub mod compat;
pub mod config;
pub mod conn;
pub mod demo;
pub mod ghost;
pub mod observe;
pub mod ops;
pub mod run;
pub mod service;
pub mod shared;
pub mod snapshot;
pub mod tls;

pub use admission::{Admission, Permit, Shed};
pub use config::{Config, ConfigError, LoadError, Overrides};
pub use run::{build_server, RunningProxy};
