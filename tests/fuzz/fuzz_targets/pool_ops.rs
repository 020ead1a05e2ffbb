//! Fuzz target: the admission pool under any sequence of calls agrees with the shared model.
//!
//! The input decodes ([`Scenario::decode`]) into 1 to 3 backends (limit, optional rate,
//! slow-start ramp and learned limit), a queue bound, and up to 512 operations: every call the
//! proxy makes on the pool (arrivals, completions, requeues, waiters leaving, time passing,
//! expiry, timer polls, limit, state, share and reserved changes, capacity hand-over, queue
//! bound changes, health probes, outcomes, ramp restarts; not yet the hot-reload calls
//! `set_policy` and `add_backend`). [`model::run`] applies them to a real
//! pool and to the reference model in `sluice_plugins::pool::model`, the one the property tests
//! run too, and panics on the first broken invariant; its documentation lists them.
#![no_main]

use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use sluice_plugins::pool::model::{self, Scenario};

fuzz_target!(|data: &[u8]| {
    model::run(&Scenario::decode(data), Instant::now());
});
