//! What the frontend does when a device's backend dies: the per-device
//! [`RestartPolicy`].
//!
//! `never` (the default) keeps today's semantics: the device is failed for
//! good (reads return all-ones, virtio devices show DEVICE_NEEDS_RESET).
//! `on-failure` replaces the backend under the running guest: a spawned
//! Outboard backend is spawned again with the same program and arguments,
//! a vhost-user backend is reconnected at the same socket path. Restarts
//! wait `backoff` after a death (doubling after each restart that did not
//! survive a second, up to [`MAX_BACKOFF`]) and stop after `limit`
//! restarts; past the limit the device fails as under `never`.
//! docs/architecture.md ("Restart") tells the whole sequence.

use std::time::Duration;

use thiserror::Error;

/// Longest wait between two restarts, however often the backend dies.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Why a policy could not be parsed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    /// unknown restart mode {0:?} (expected "never" or "on-failure")
    #[error("unknown restart mode {0:?} (expected \"never\" or \"on-failure\")")]
    Mode(String),
}

/// When a device's backend is replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RestartMode {
    /// A dead backend fails the device for good.
    #[default]
    Never,
    /// A dead backend is replaced, within the policy's limit.
    OnFailure,
}

impl std::str::FromStr for RestartMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "never" => Ok(RestartMode::Never),
            "on-failure" => Ok(RestartMode::OnFailure),
            other => Err(Error::Mode(other.to_owned())),
        }
    }
}

/// A device's restart policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// When to restart.
    pub mode: RestartMode,
    /// Wait before the first restart after a death.
    pub backoff: Duration,
    /// Most restarts over the device's lifetime (live upgrades not counted).
    pub limit: u32,
}

/// The default backoff before a restart.
pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(10);
/// The default restart limit.
pub const DEFAULT_LIMIT: u32 = 1000;

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            mode: RestartMode::Never,
            backoff: DEFAULT_BACKOFF,
            limit: DEFAULT_LIMIT,
        }
    }
}

impl RestartPolicy {
    /// `on-failure` with the default backoff and limit.
    pub fn on_failure() -> Self {
        RestartPolicy {
            mode: RestartMode::OnFailure,
            ..RestartPolicy::default()
        }
    }

    /// True when a device that has been restarted `done` times may be
    /// restarted again.
    pub fn allows(&self, done: u32) -> bool {
        self.mode == RestartMode::OnFailure && done < self.limit
    }

    /// The wait before a restart after `quick` deaths in a row that each
    /// came less than a second after the previous restart: the backoff,
    /// doubled for each, capped at [`MAX_BACKOFF`].
    pub fn delay(&self, quick: u32) -> Duration {
        let factor = 1u32.checked_shl(quick.min(16)).unwrap_or(u32::MAX);
        self.backoff.saturating_mul(factor).min(MAX_BACKOFF)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_when_parsed_then_known_names_only() {
        assert_eq!("never".parse(), Ok(RestartMode::Never));
        assert_eq!("on-failure".parse(), Ok(RestartMode::OnFailure));
        assert_eq!(
            "always".parse::<RestartMode>(),
            Err(Error::Mode("always".into()))
        );
    }

    #[test]
    fn allows_when_never_or_limit_reached_then_false() {
        assert!(!RestartPolicy::default().allows(0));
        let p = RestartPolicy {
            limit: 2,
            ..RestartPolicy::on_failure()
        };
        assert!(p.allows(0) && p.allows(1) && !p.allows(2));
    }

    #[test]
    fn delay_when_quick_deaths_then_doubles_up_to_the_cap() {
        let p = RestartPolicy::on_failure();
        assert_eq!(p.delay(0), DEFAULT_BACKOFF);
        assert_eq!(p.delay(2), DEFAULT_BACKOFF * 4);
        assert_eq!(p.delay(40), MAX_BACKOFF);
    }
}
