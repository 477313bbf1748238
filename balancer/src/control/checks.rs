//! Health-check registrations. Every registration gets a fresh id (its epoch) that is never
//! reused, and an event is matched to a backend by that id, which names the backend by
//! address, never by position: an event of a superseded registration (a removed backend, a
//! changed check) finds nothing and is dropped, so it cannot land on the backend that moved
//! into the old position. A backend whose check is unchanged keeps its registration across
//! a reload, and with it its check history.

use std::{collections::HashMap, net::SocketAddr};

use balancer_health::{Health as Checked, HealthSpec, TargetId};

/// Who a checked address belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Owner {
    /// An L4 service, by name.
    Service(String),
    /// An L7 pool, by name.
    Pool(String),
}

/// One registered check.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    /// Service or pool.
    pub owner: Owner,
    /// Checked address.
    pub address: SocketAddr,
    /// The check.
    pub spec: HealthSpec,
}

/// A check to start.
#[derive(Debug, Clone, PartialEq)]
pub struct Start {
    /// Its id.
    pub id: TargetId,
    /// Checked address.
    pub address: SocketAddr,
    /// The check.
    pub spec: HealthSpec,
    /// The debounced state it starts from (the last known result).
    pub initial: Checked,
}

/// What to tell the monitor after a reload.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct CheckChanges {
    /// Registrations to stop.
    pub stop: Vec<TargetId>,
    /// Registrations to start.
    pub start: Vec<Start>,
}

/// The registrations in force.
#[derive(Debug, Default)]
pub struct Checks {
    next: TargetId,
    by_id: HashMap<TargetId, Registration>,
}

impl Checks {
    /// The registration behind an event's id; `None` for a superseded one.
    pub fn resolve(&self, id: TargetId) -> Option<&Registration> {
        self.by_id.get(&id)
    }

    /// The id of the check of `address` in `owner`.
    pub fn id_of(&self, owner: &Owner, address: SocketAddr) -> Option<TargetId> {
        self.by_id
            .iter()
            .find(|(_, r)| r.owner == *owner && r.address == address)
            .map(|(id, _)| *id)
    }

    /// Moves the check of `address` in `owner` to a fresh id, to restart it from a state the
    /// caller chose: events the old registration already queued are then dropped. Returns
    /// (old id, the check to start).
    pub fn renew(
        &mut self,
        owner: &Owner,
        address: SocketAddr,
        initial: Checked,
    ) -> Option<(TargetId, Start)> {
        let old = self.id_of(owner, address)?;
        let r = self.by_id.remove(&old)?;
        self.next += 1;
        let id = self.next;
        let start = Start {
            id,
            address,
            spec: r.spec.clone(),
            initial,
        };
        self.by_id.insert(id, r);
        Some((old, start))
    }

    /// Makes `wanted` (owner, address, check, state to start from if new) the registrations
    /// in force: unchanged ones are kept, the others stopped or started under a new id.
    pub fn reconcile(
        &mut self,
        wanted: Vec<(Owner, SocketAddr, HealthSpec, Checked)>,
    ) -> CheckChanges {
        let mut keep: HashMap<TargetId, Registration> = HashMap::new();
        let mut changes = CheckChanges::default();
        for (owner, address, spec, initial) in wanted {
            let same = self
                .by_id
                .iter()
                .find(|(_, r)| r.owner == owner && r.address == address && r.spec == spec)
                .map(|(id, _)| *id);
            if let Some(id) = same
                && let Some(r) = self.by_id.remove(&id)
            {
                keep.insert(id, r);
                continue;
            }
            self.next += 1;
            let id = self.next;
            changes.start.push(Start {
                id,
                address,
                spec: spec.clone(),
                initial,
            });
            keep.insert(
                id,
                Registration {
                    owner,
                    address,
                    spec,
                },
            );
        }
        changes.stop = std::mem::take(&mut self.by_id).into_keys().collect();
        changes.stop.sort_unstable();
        self.by_id = keep;
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(interval_ms: u64) -> HealthSpec {
        let t: toml::Table =
            toml::from_str(&format!("kind = \"tcp\"\ninterval = \"{interval_ms}ms\"")).unwrap();
        crate::config::health::spec_from_table(&t).unwrap()
    }

    #[test]
    fn a_renewed_check_has_a_new_id_and_the_old_one_resolves_to_nothing() {
        let mut c = Checks::default();
        let s = spec(500);
        let ch = c.reconcile(web(&["10.0.0.1:80", "10.0.0.2:80"], &s));
        let owner = Owner::Service("web".into());
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let old = c.id_of(&owner, a).unwrap();
        let (was, start) = c.renew(&owner, a, Checked::Down).unwrap();
        assert_eq!(was, old);
        assert!(ch.start.iter().all(|x| x.id != start.id), "never reused");
        assert_eq!((start.address, start.initial), (a, Checked::Down));
        assert!(
            c.resolve(old).is_none(),
            "a queued event of the old check is dropped"
        );
        assert_eq!(c.resolve(start.id).unwrap().address, a);
        // An unchanged reload keeps the renewed registration.
        let again = c.reconcile(web(&["10.0.0.1:80", "10.0.0.2:80"], &s));
        assert!(again.start.is_empty() && again.stop.is_empty());
        assert!(
            c.renew(&owner, "10.0.0.9:80".parse().unwrap(), Checked::Down)
                .is_none()
        );
    }

    fn web(addrs: &[&str], s: &HealthSpec) -> Vec<(Owner, SocketAddr, HealthSpec, Checked)> {
        addrs
            .iter()
            .map(|a| {
                (
                    Owner::Service("web".into()),
                    a.parse().unwrap(),
                    s.clone(),
                    Checked::Up,
                )
            })
            .collect()
    }

    #[test]
    fn an_event_of_a_removed_backend_finds_nothing_after_the_reload() {
        let s = spec(500);
        let mut c = Checks::default();
        let first = c.reconcile(web(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"], &s));
        assert_eq!(first.start.len(), 3);
        let id2 = c.id_of(
            &Owner::Service("web".into()),
            "10.0.0.2:80".parse().unwrap(),
        );
        let id3 = c.id_of(
            &Owner::Service("web".into()),
            "10.0.0.3:80".parse().unwrap(),
        );
        // .2 leaves: .3 moves into its position.
        let second = c.reconcile(web(&["10.0.0.1:80", "10.0.0.3:80"], &s));
        assert!(second.start.is_empty(), "{second:?}");
        assert_eq!(second.stop, vec![id2.unwrap()]);
        assert!(c.resolve(id2.unwrap()).is_none());
        let r3 = c.resolve(id3.unwrap()).unwrap();
        assert_eq!(r3.address, "10.0.0.3:80".parse().unwrap());
    }

    #[test]
    fn a_changed_check_gets_a_new_id_from_the_last_known_state() {
        let mut c = Checks::default();
        c.reconcile(web(&["10.0.0.1:80"], &spec(500)));
        let owner = Owner::Service("web".into());
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let old = c.id_of(&owner, a).unwrap();
        let ch = c.reconcile(vec![(owner.clone(), a, spec(200), Checked::Down)]);
        assert_eq!(ch.stop, vec![old]);
        assert_eq!(ch.start.len(), 1);
        assert_eq!(ch.start[0].initial, Checked::Down);
        assert_ne!(ch.start[0].id, old);
        assert!(c.resolve(old).is_none());
        // Ids are never reused, even after everything was removed.
        c.reconcile(Vec::new());
        let again = c.reconcile(web(&["10.0.0.1:80"], &spec(500)));
        assert!(again.start[0].id > ch.start[0].id);
    }
}
