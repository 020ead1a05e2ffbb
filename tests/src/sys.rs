//! Process limits for large test runs.
//!
//! Thousands of terminals need thousands of sockets, more than the usual
//! default soft limit of 1024 open files. [`raise_nofile_limit`] lifts the soft
//! limit to the hard limit; where that is not enough, raise the hard limit
//! before starting (`ulimit -n 65536` as root, or the service manager's
//! `LimitNOFILE=`).

use std::io;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the new soft
/// limit. On platforms without rlimits it returns `Ok(u64::MAX)`.
pub fn raise_nofile_limit() -> io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// Best-effort [`raise_nofile_limit`]: returns the soft limit in force
/// afterwards (`None` if it cannot even be read). Never fails; meant for test
/// set-up, where a low limit shows up later as connect errors.
pub fn raise_fd_limit() -> Option<u64> {
    raise_nofile_limit().ok().or_else(|| {
        rlimit::getrlimit(rlimit::Resource::NOFILE)
            .ok()
            .map(|(soft, _)| soft)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_the_limit_never_lowers_it() {
        let before = rlimit::getrlimit(rlimit::Resource::NOFILE)
            .expect("getrlimit")
            .0;
        let after = raise_nofile_limit().expect("raise");
        assert!(after >= before);
    }
}
