//! The relay's door: how many connections may be open without having
//! identified, in all and per source IP, and when to make a client prove
//! its address first (a QUIC Retry). A connection counts from its first
//! packet until it identifies or ends; identified nodes are bounded by the
//! routing table's limits instead.

use std::collections::HashMap;
use std::net::IpAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryPolicy {
    /// Never send Retry (one round trip less; no address validation).
    Never,
    /// Send Retry once half the unidentified slots are taken.
    UnderLoad,
    /// Always validate the client's address first.
    Always,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    pub max_unidentified: usize,
    pub max_unidentified_per_ip: usize,
    pub retry: RetryPolicy,
}

impl Default for AdmissionLimits {
    fn default() -> Self {
        AdmissionLimits {
            max_unidentified: 1024,
            max_unidentified_per_ip: 16,
            retry: RetryPolicy::UnderLoad,
        }
    }
}

/// What to do with a new connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Accept it; it holds an unidentified slot until [`Admission::release`].
    Accept,
    /// Ask the client to prove its address (QUIC Retry) before anything.
    Retry,
    /// Refuse: too many unidentified connections in all, or from this IP.
    Refuse(RefuseReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefuseReason {
    TooManyUnidentified,
    TooManyFromAddress,
}

impl RefuseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RefuseReason::TooManyUnidentified => "too_many_unidentified",
            RefuseReason::TooManyFromAddress => "too_many_from_address",
        }
    }
}

#[derive(Debug, Default)]
pub struct Admission {
    limits: AdmissionLimits,
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

impl Admission {
    pub fn new(limits: AdmissionLimits) -> Self {
        Admission {
            limits,
            ..Default::default()
        }
    }

    pub fn unidentified(&self) -> usize {
        self.total
    }

    /// A connection attempt from `ip`; `validated` once it has answered a
    /// Retry (or quinn validated its address otherwise).
    pub fn decide(&mut self, ip: IpAddr, validated: bool) -> Decision {
        let from_ip = self.per_ip.get(&ip).copied().unwrap_or(0);
        if self.total >= self.limits.max_unidentified {
            return Decision::Refuse(RefuseReason::TooManyUnidentified);
        }
        if from_ip >= self.limits.max_unidentified_per_ip {
            return Decision::Refuse(RefuseReason::TooManyFromAddress);
        }
        let retry = match self.limits.retry {
            RetryPolicy::Never => false,
            RetryPolicy::Always => true,
            RetryPolicy::UnderLoad => self.total * 2 >= self.limits.max_unidentified,
        };
        if retry && !validated {
            return Decision::Retry;
        }
        self.total += 1;
        *self.per_ip.entry(ip).or_default() += 1;
        Decision::Accept
    }

    /// An accepted connection identified or ended: its slot is free.
    pub fn release(&mut self, ip: IpAddr) {
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n -= 1;
            self.total -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    fn limits(retry: RetryPolicy) -> AdmissionLimits {
        AdmissionLimits {
            max_unidentified: 4,
            max_unidentified_per_ip: 2,
            retry,
        }
    }

    #[test]
    fn caps_in_all_and_per_address() {
        let mut a = Admission::new(limits(RetryPolicy::Never));
        assert_eq!(a.decide(ip(1), false), Decision::Accept);
        assert_eq!(a.decide(ip(1), false), Decision::Accept);
        assert_eq!(
            a.decide(ip(1), false),
            Decision::Refuse(RefuseReason::TooManyFromAddress)
        );
        assert_eq!(a.decide(ip(2), false), Decision::Accept);
        assert_eq!(a.decide(ip(3), false), Decision::Accept);
        assert_eq!(
            a.decide(ip(4), false),
            Decision::Refuse(RefuseReason::TooManyUnidentified)
        );
        a.release(ip(1));
        assert_eq!(a.unidentified(), 3);
        assert_eq!(a.decide(ip(4), false), Decision::Accept);
        // Releasing what was never admitted changes nothing.
        a.release(ip(9));
        assert_eq!(a.unidentified(), 4);
    }

    #[test]
    fn retry_always_or_under_load() {
        let mut always = Admission::new(limits(RetryPolicy::Always));
        assert_eq!(always.decide(ip(1), false), Decision::Retry);
        assert_eq!(always.decide(ip(1), true), Decision::Accept);
        let mut load = Admission::new(limits(RetryPolicy::UnderLoad));
        assert_eq!(load.decide(ip(1), false), Decision::Accept);
        assert_eq!(load.decide(ip(2), false), Decision::Accept);
        // Half the slots taken: new clients prove their address first.
        assert_eq!(load.decide(ip(3), false), Decision::Retry);
        assert_eq!(load.decide(ip(3), true), Decision::Accept);
    }
}
