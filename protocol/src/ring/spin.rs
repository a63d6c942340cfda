//! [`SpinBudget`]: how long a side of a command ring polls before it
//! sleeps on its eventfd.

use std::time::Duration;

/// An adaptive spin budget, in the manner of KVM's halt polling: how long
/// a side polls shared memory before it sleeps on its eventfd.
///
/// A sleep that ended sooner than the longest budget would have been
/// caught by a longer spin: the budget doubles. A sleep that lasted longer
/// means spinning was wasted: the budget halves, down to none. So a busy
/// peer is met spinning, and an idle one (or one of many that take turns
/// on a small machine) costs no CPU.
#[derive(Debug, Clone, Copy)]
pub struct SpinBudget {
    ns: u64,
    max: u64,
    floor: u64,
}

/// Spin a budget grows from when it was zero.
const SPIN_START_NS: u64 = 1_000;

impl SpinBudget {
    /// A budget of at most `max`, starting at a quarter of it, that may
    /// shrink to nothing.
    pub fn new(max: Duration) -> Self {
        let max = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
        SpinBudget {
            ns: max / 4,
            max,
            floor: 0,
        }
    }

    /// The same, never below `floor`: for a side that waits for an answer
    /// it needs anyway, where a short spin costs nothing and keeps the
    /// budget able to learn.
    pub fn with_floor(max: Duration, floor: Duration) -> Self {
        let mut b = SpinBudget::new(max);
        b.floor = u64::try_from(floor.as_nanos()).unwrap_or(0).min(b.max);
        b.ns = b.ns.max(b.floor);
        b
    }

    /// How long to spin now.
    pub fn budget(&self) -> Duration {
        Duration::from_nanos(self.ns)
    }

    /// The longest budget.
    pub fn max(&self) -> Duration {
        Duration::from_nanos(self.max)
    }

    /// After a spin cut short because another process wanted the CPU:
    /// halves the budget, so that peers sharing a CPU take turns asleep.
    pub fn contended(&mut self) {
        self.ns /= 2;
        if self.ns < SPIN_START_NS {
            self.ns = 0;
        }
        self.ns = self.ns.max(self.floor);
    }

    /// After a spin that met what it waited for: doubles the budget.
    pub fn caught(&mut self) {
        self.ns = (self.ns * 2).clamp(SPIN_START_NS.min(self.max), self.max);
    }

    /// After a spin that ran out before what it waited for came: halves
    /// the budget (the wait that follows was long anyway).
    pub fn missed(&mut self) {
        self.contended();
    }

    /// After a sleep of `slept` (the spin before it found nothing).
    pub fn slept(&mut self, slept: Duration) {
        let slept = u64::try_from(slept.as_nanos()).unwrap_or(u64::MAX);
        if slept <= self.max {
            self.ns = (self.ns * 2).clamp(SPIN_START_NS, self.max);
        } else {
            self.contended();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spin_budget_when_sleeps_short_then_grows_when_long_then_shrinks_to_none() {
        let mut b = SpinBudget::new(Duration::from_micros(64));
        assert_eq!(b.budget(), Duration::from_micros(16));
        b.slept(Duration::from_micros(10));
        assert_eq!(b.budget(), Duration::from_micros(32));
        for _ in 0..3 {
            b.slept(Duration::from_micros(10));
        }
        assert_eq!(b.budget(), b.max());
        for _ in 0..8 {
            b.slept(Duration::from_secs(1));
        }
        assert_eq!(b.budget(), Duration::ZERO);
        b.slept(Duration::from_micros(1));
        assert_eq!(b.budget(), Duration::from_nanos(SPIN_START_NS));
        let mut f = SpinBudget::with_floor(Duration::from_micros(8), Duration::from_micros(2));
        for _ in 0..8 {
            f.missed();
        }
        assert_eq!(
            f.budget(),
            Duration::from_micros(2),
            "never below the floor"
        );
        f.caught();
        f.caught();
        f.caught();
        assert_eq!(f.budget(), f.max());
    }
}
