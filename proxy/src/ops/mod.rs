//! Operating a running proxy: the admin API, hot reload, health checks, the upgrade hand-over
//! (and the backend connections it counts), and the budget shared between instances through
//! Redis.

pub mod admin;
pub mod cluster;
pub mod handoff;
pub mod health;
pub mod reload;
pub mod resp;
pub mod upstream_conns;
