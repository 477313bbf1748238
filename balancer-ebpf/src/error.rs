//! The one error type of the packet path. Every step returns `Result<_, Error>`; only the
//! entry point turns an error into an XDP action and a reason counter, so a step cannot count
//! twice or forget to count.

use balancer_common::Reason;

/// `XDP_DROP`.
pub const XDP_DROP: u32 = 1;
/// `XDP_PASS`.
pub const XDP_PASS: u32 = 2;
/// `XDP_TX`.
pub const XDP_TX: u32 = 3;

/// Why a packet is not forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// A unicast frame to another MAC than the ingress interface's (flooded by a switch).
    NotForUs,
    /// Not IPv4/IPv6.
    NotIp,
    /// IPv4 fragment, IPv4 with options, bad IP version.
    UnsupportedIp,
    /// Neither TCP nor UDP (ICMP, extension headers).
    NotTcpUdp,
    /// A header was cut short, or the frame could not be resized.
    Truncated,
    /// Not for a VIP nor a reply to a NAT flow.
    NotVip,
    /// To a port of the SNAT range, but no reply entry matches (the flow is gone).
    NoReplyFlow,
    /// The FIB has no route for the rewritten packet.
    NoRoute,
    /// The next hop's neighbour is not resolved yet.
    NoNeighbour,
    /// No SNAT port was free.
    SnatExhausted,
    /// The flow table refused an insert.
    FlowTable,
    /// The service has no live backend and the packet cannot be answered with a reset.
    NoBackend,
    /// The flow's backend is down and the packet is dropped (service set to drop, a reply
    /// from the backend, or no reset possible).
    BackendDown,
    /// The flow's SNAT port belongs to another flow now, and no reset is possible.
    PortTaken,
    /// A backend's reply came in on another interface than its flow's.
    WrongInterface,
    /// The service's new-flow rate limit was reached on this CPU.
    RateLimited,
    /// ICMP that is not an error about a balanced flow (echo, other types, errors about
    /// packets of no flow): passed.
    IcmpUnrelated,
    /// An ICMP error whose lengths or quoted headers do not hold up: passed.
    IcmpMalformed,
    /// Too big for the egress link, IPv4 without DF (XDP cannot fragment): dropped.
    TooBigNoDf,
    /// Too big for the egress link, and the answer was rate-limited or could not be built
    /// (the frame may be changed already): dropped.
    TooBig,
    /// The frame could not be resized for its next hop's 802.1Q tag after the rewrite:
    /// dropped.
    VlanResize,
    /// A per-CPU map slot that always exists was missing: passed, not counted.
    Map,
}

impl Error {
    /// The XDP action for a packet that failed with this error.
    pub const fn action(self) -> u32 {
        match self {
            Error::NotForUs
            | Error::NotIp
            | Error::UnsupportedIp
            | Error::NotTcpUdp
            | Error::Truncated
            | Error::NotVip
            | Error::NoReplyFlow
            | Error::NoRoute
            | Error::IcmpUnrelated
            | Error::IcmpMalformed
            | Error::Map => XDP_PASS,
            Error::NoNeighbour
            | Error::SnatExhausted
            | Error::FlowTable
            | Error::NoBackend
            | Error::BackendDown
            | Error::PortTaken
            | Error::WrongInterface
            | Error::RateLimited
            | Error::TooBigNoDf
            | Error::TooBig
            | Error::VlanResize => XDP_DROP,
        }
    }

    /// The reason counter it bumps.
    pub const fn reason(self) -> Option<Reason> {
        Some(match self {
            Error::NotForUs => Reason::PassNotForUs,
            Error::NotIp => Reason::PassNotIp,
            Error::UnsupportedIp => Reason::PassUnsupportedIp,
            Error::NotTcpUdp => Reason::PassNotTcpUdp,
            Error::Truncated => Reason::PassTruncated,
            Error::NotVip => Reason::PassNotVip,
            Error::NoReplyFlow => Reason::PassNoReplyFlow,
            Error::NoRoute => Reason::PassNoRoute,
            Error::NoNeighbour => Reason::DropNoNeighbour,
            Error::SnatExhausted => Reason::DropSnatExhausted,
            Error::FlowTable => Reason::DropFlowTable,
            Error::NoBackend => Reason::NoBackend,
            Error::BackendDown => Reason::DropBackendDown,
            Error::PortTaken => Reason::PortTaken,
            Error::WrongInterface => Reason::DropWrongInterface,
            Error::RateLimited => Reason::DropRateLimited,
            Error::IcmpUnrelated => Reason::PassIcmp,
            Error::IcmpMalformed => Reason::PassIcmpMalformed,
            Error::TooBigNoDf | Error::TooBig => Reason::DropTooBig,
            Error::VlanResize => Reason::DropVlanResize,
            Error::Map => return None,
        })
    }
}

/// What the program does with a packet it handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Rewritten, back out of the interface it came in on.
    Tx,
    /// Rewritten, out of this interface.
    Redirect(u32),
    /// Turned into a TCP reset to its sender (`XDP_TX`), for this reason.
    Reset(Reason),
    /// An ICMP error sent (translated, forwarded or built) back out of the interface it came
    /// in on, for this reason.
    IcmpTx(Reason),
    /// An ICMP error sent out of this interface, for this reason.
    IcmpRedirect(Reason, u32),
    /// Untouched, but too big for its egress link of this MTU: the entry answers it with
    /// "fragmentation needed" / "packet too big" (never an action of its own).
    TooBig(u32),
}

impl Verdict {
    /// The reason counter it bumps.
    pub const fn reason(self) -> Reason {
        match self {
            Verdict::Tx => Reason::Tx,
            Verdict::Redirect(_) => Reason::Redirect,
            Verdict::Reset(r) | Verdict::IcmpTx(r) | Verdict::IcmpRedirect(r, _) => r,
            Verdict::TooBig(_) => Reason::TooBig,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_are_passed_and_drops_dropped() {
        for e in [
            Error::NotForUs,
            Error::NotIp,
            Error::UnsupportedIp,
            Error::NotTcpUdp,
            Error::Truncated,
            Error::NotVip,
            Error::NoReplyFlow,
            Error::NoRoute,
            Error::IcmpUnrelated,
            Error::IcmpMalformed,
        ] {
            assert_eq!(e.action(), XDP_PASS, "{e:?}");
            assert!(e.reason().is_some_and(|r| r.name().starts_with("pass_")));
        }
        for e in [
            Error::NoNeighbour,
            Error::SnatExhausted,
            Error::FlowTable,
            Error::BackendDown,
            Error::TooBigNoDf,
            Error::TooBig,
            Error::VlanResize,
        ] {
            assert_eq!(e.action(), XDP_DROP, "{e:?}");
            assert!(e.reason().is_some_and(|r| r.name().starts_with("drop_")));
        }
        assert_eq!(Error::NoBackend.action(), XDP_DROP);
        assert_eq!(Error::Map.reason(), None);
        assert_eq!(Verdict::Redirect(3).reason(), Reason::Redirect);
    }
}
