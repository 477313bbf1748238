//! Failover services: which backend is the active one.

use tracing::info;

use crate::{
    config::Scheduler,
    control::state::{Event, ServiceState},
};

/// Keeps the active backend while it is eligible (and, with failback, while no eligible
/// backend has a better priority); else picks the eligible one with the best priority (ties:
/// config order). Returns the event when the active backend changes.
pub fn choose_active(s: &mut ServiceState) -> Option<Event> {
    if s.spec.scheduler != Scheduler::Failover {
        return None;
    }
    let best = s
        .backends
        .iter()
        .enumerate()
        .filter(|(_, b)| b.eligible())
        .min_by_key(|(i, b)| (b.priority, *i))
        .map(|(i, _)| i);
    let current = s.active.and_then(|a| s.backends.get(a).map(|b| (a, b)));
    let keep = match current {
        Some((_, a)) if a.eligible() => {
            !s.spec.failback
                || best
                    .and_then(|b| s.backends.get(b))
                    .is_none_or(|b| b.priority >= a.priority)
        }
        _ => false,
    };
    let new = if keep { s.active } else { best };
    if new == s.active {
        return None;
    }
    let from = current.map(|(_, b)| b.address);
    let to = new.and_then(|a| s.backends.get(a)).map(|b| b.address);
    info!(service = %s.spec.name, from = ?from, to = ?to, "active backend changed");
    s.active = new;
    Some(Event::Failover {
        service: s.spec.name.clone(),
        from,
        to,
    })
}

#[cfg(test)]
mod tests {
    use crate::control::{
        fake::Rig,
        state::{BackendHealth, Event},
    };

    fn hl7(failback: bool) -> String {
        format!(
            r#"
[[service]]
name = "hl7"
vip = "10.77.0.100:6661"
scheduler = "failover"
failback = {failback}
ring_size = 7
health = {{ kind = "mllp" }}
backends = [
  {{ address = "10.77.0.11:6661", priority = 1 }},
  {{ address = "10.77.0.12:6661", priority = 2 }},
  {{ address = "10.77.0.13:6661", priority = 3 }},
]
"#
        )
    }

    fn active(rig: &Rig) -> Option<String> {
        let s = rig.service("hl7");
        s.active.map(|a| s.backends[a].address.to_string())
    }

    #[test]
    fn the_best_priority_takes_over_and_a_recovered_one_does_not_fail_back() {
        let mut rig = Rig::new();
        let p = rig.reload(&hl7(false)).unwrap();
        assert_eq!(
            p.events,
            vec![Event::Failover {
                service: "hl7".into(),
                from: None,
                to: Some("10.77.0.11:6661".parse().unwrap()),
            }]
        );
        assert_eq!(active(&rig).as_deref(), Some("10.77.0.11:6661"));
        // Only the active backend is in the ring; standbys are down to the dataplane.
        assert_eq!(rig.ring_addrs("hl7").len(), 1);
        rig.set_health("hl7", "10.77.0.11:6661", BackendHealth::Down);
        assert_eq!(active(&rig).as_deref(), Some("10.77.0.12:6661"));
        assert_eq!(
            rig.ring_addrs("hl7").into_iter().collect::<Vec<_>>(),
            vec!["10.77.0.12:6661".to_string()]
        );
        rig.set_health("hl7", "10.77.0.11:6661", BackendHealth::Up);
        assert_eq!(
            active(&rig).as_deref(),
            Some("10.77.0.12:6661"),
            "no failback"
        );
        // A reload keeps the active backend.
        rig.reload(&hl7(false)).unwrap();
        assert_eq!(active(&rig).as_deref(), Some("10.77.0.12:6661"));
        // With failback on, the better priority takes the traffic back at once.
        rig.reload(&hl7(true)).unwrap();
        rig.set_health("hl7", "10.77.0.13:6661", BackendHealth::Down);
        assert_eq!(active(&rig).as_deref(), Some("10.77.0.11:6661"));
    }

    #[test]
    fn no_eligible_backend_leaves_no_active_one_and_an_empty_ring() {
        let mut rig = Rig::new();
        rig.reload(&hl7(false)).unwrap();
        for a in ["10.77.0.11:6661", "10.77.0.12:6661", "10.77.0.13:6661"] {
            rig.set_health("hl7", a, BackendHealth::Down);
        }
        assert_eq!(active(&rig), None);
        assert!(rig.ring_addrs("hl7").is_empty());
        let id = rig.service("hl7").id;
        assert_eq!(
            rig.maps.ring_slots(id).into_iter().collect::<Vec<_>>(),
            vec![balancer_common::NO_BACKEND]
        );
    }

    #[test]
    fn a_restarted_controller_keeps_the_active_backend_of_the_live_ring() {
        let mut first = Rig::new();
        first.reload(&hl7(false)).unwrap();
        first.set_health("hl7", "10.77.0.11:6661", BackendHealth::Down);
        first.set_health("hl7", "10.77.0.11:6661", BackendHealth::Up);
        assert_eq!(active(&first).as_deref(), Some("10.77.0.12:6661"));
        let mut maps = first.maps.clone();
        maps.adopted = true;
        let mut second = Rig {
            maps,
            vips: first.vips.clone(),
            state: None,
            host: first.host.clone(),
        };
        let p = second.reload(&hl7(false)).unwrap();
        assert!(p.events.is_empty(), "{:?}", p.events);
        assert_eq!(active(&second).as_deref(), Some("10.77.0.12:6661"));
    }
}
