//! Maglev consistent hashing (Eisenbud et al., NSDI 2016) with weights.
//!
//! Each backend walks its own permutation of the table (offset and skip from two hashes of
//! its name); in each round a backend claims its next free slot when its weight credit allows,
//! so slots end up in proportion to the weights, and a backend set change moves few slots.
//!
//! The table depends only on the backends' names (addresses) and weights, never on their
//! slot numbers, the order they are given in or the order health changes arrived in: every
//! balancer of an ECMP group builds the same ring from the same config, so a DSR flow the
//! routers rehash to another balancer reaches the same backend.

use balancer_common::NO_BACKEND;

/// One backend as the table builder sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// A stable identity (e.g. "10.77.0.11:7002"): it alone decides the permutation.
    pub name: String,
    /// Relative weight; 0 takes no slot.
    pub weight: u32,
    /// What the slot stores (the dataplane's backend index).
    pub value: u32,
}

/// 64-bit FNV-1a followed by a murmur3 finalizer: a stable hash for backend names.
fn hash64(data: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Builds a table of `size` slots (a prime) over `entries`. Slots hold `Entry::value`, or
/// [`NO_BACKEND`] everywhere when no entry has a weight.
pub fn build(entries: &[Entry], size: u32) -> Vec<u32> {
    let m = size as usize;
    let mut table = vec![NO_BACKEND; m];
    let mut live: Vec<&Entry> = entries.iter().filter(|e| e.weight > 0).collect();
    // Claim order within a round decides contested slots: make it independent of input order.
    live.sort_by(|a, b| a.name.cmp(&b.name));
    if live.is_empty() || m == 0 {
        return table;
    }
    let max_w = live.iter().map(|e| e.weight as u64).max().unwrap_or(1);
    let n = live.len();
    let m32 = size;
    let mut pos = Vec::with_capacity(n);
    let mut skip = Vec::with_capacity(n);
    for e in &live {
        pos.push((hash64(e.name.as_bytes(), 0xdead_beef) % m as u64) as u32);
        skip.push((hash64(e.name.as_bytes(), 0x0bad_cafe) % (m as u64 - 1).max(1)) as u32 + 1);
    }
    // Build over positions in `live` in a compact table (u16 when it fits: half the cache
    // footprint of the random probes that dominate the build), then map to values.
    const EMPTY: u16 = u16::MAX;
    let mut slots = vec![EMPTY; m];
    if n >= EMPTY as usize {
        return build_wide(&live, &mut pos, &skip, max_w, size);
    }
    let mut credit = vec![0u64; n];
    let mut filled = 0usize;
    let equal = live.iter().all(|e| e.weight as u64 == max_w);
    // Probing costs M/(empty slots) per fill, so the last few percent of the table would
    // take most of the build. From `tail` on, a backend takes the first empty slot at or after
    // its next permutation position instead: same turns (same balance), deterministic, and
    // only those last slots can land differently from plain Maglev.
    let tail = m - m / 64;
    let mut empties: Option<std::collections::BTreeSet<u32>> = None;
    'outer: loop {
        for i in 0..n {
            if !equal {
                credit[i] += live[i].weight as u64;
                if credit[i] < max_w {
                    continue;
                }
                credit[i] -= max_w;
            }
            let (mut p, k) = (pos[i], skip[i]);
            if let Some(free) = empties.as_mut() {
                let c = free
                    .range(p..)
                    .next()
                    .or_else(|| free.iter().next())
                    .copied();
                let Some(c) = c else { break 'outer };
                free.remove(&c);
                slots[c as usize] = i as u16;
                p += k;
                p -= if p >= m32 { m32 } else { 0 };
            } else {
                let base = slots.as_mut_ptr();
                loop {
                    let c = p as usize;
                    p += k;
                    p -= if p >= m32 { m32 } else { 0 };
                    // SAFETY: `c < m` always: positions start below m and stay below it
                    // (p + k < 2m, reduced once), and `slots` has m elements.
                    let cell = unsafe { &mut *base.add(c) };
                    if *cell == EMPTY {
                        *cell = i as u16;
                        break;
                    }
                }
            }
            pos[i] = p;
            filled += 1;
            if filled == m {
                break 'outer;
            }
            if filled == tail && empties.is_none() {
                empties = Some((0..m32).filter(|c| slots[*c as usize] == EMPTY).collect());
            }
        }
    }
    for (t, s) in table.iter_mut().zip(&slots) {
        *t = live[*s as usize].value;
    }
    table
}

/// The same fill for more than 65534 live backends (u32 positions).
fn build_wide(live: &[&Entry], pos: &mut [u32], skip: &[u32], max_w: u64, size: u32) -> Vec<u32> {
    let m = size as usize;
    let mut table = vec![NO_BACKEND; m];
    let mut credit = vec![0u64; live.len()];
    let mut filled = 0usize;
    loop {
        for i in 0..live.len() {
            credit[i] += live[i].weight as u64;
            if credit[i] < max_w {
                continue;
            }
            credit[i] -= max_w;
            loop {
                let c = pos[i];
                pos[i] += skip[i];
                if pos[i] >= size {
                    pos[i] -= size;
                }
                if table[c as usize] == NO_BACKEND {
                    table[c as usize] = live[i].value;
                    filled += 1;
                    break;
                }
            }
            if filled == m {
                return table;
            }
        }
    }
}

/// True when `n` is prime (ring sizes must be, so every skip visits every slot).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while (d as u64) * (d as u64) <= n as u64 {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(n: u32, weight: impl Fn(u32) -> u32) -> Vec<Entry> {
        (0..n)
            .map(|i| Entry {
                name: format!("10.0.{}.{}:7002", i / 250, i % 250),
                weight: weight(i),
                value: i,
            })
            .collect()
    }

    fn counts(t: &[u32], n: u32) -> Vec<u64> {
        let mut c = vec![0u64; n as usize];
        for v in t {
            c[*v as usize] += 1;
        }
        c
    }

    #[test]
    fn equal_weights_balance_within_one_percent() {
        let t = build(&entries(100, |_| 1), 65537);
        let ideal = 65537.0 / 100.0;
        for c in counts(&t, 100) {
            assert!(((c as f64) - ideal).abs() / ideal < 0.01, "{c} vs {ideal}");
        }
    }

    #[test]
    fn weights_balance_within_one_percent_of_weighted_ideal() {
        let w = |i: u32| 1 + i % 4;
        let e = entries(100, w);
        let total: u64 = e.iter().map(|e| e.weight as u64).sum();
        let t = build(&e, 65537);
        for (i, c) in counts(&t, 100).into_iter().enumerate() {
            let ideal = 65537.0 * w(i as u32) as f64 / total as f64;
            assert!(
                ((c as f64) - ideal).abs() / ideal < 0.01,
                "backend {i}: {c} vs {ideal}"
            );
        }
    }

    #[test]
    fn removing_one_of_ten_moves_at_most_fifteen_percent() {
        let all = entries(10, |_| 1);
        let before = build(&all, 65537);
        let fewer: Vec<Entry> = all.iter().filter(|e| e.value != 3).cloned().collect();
        let after = build(&fewer, 65537);
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| b != a && **b != 3)
            .count() as f64;
        let lost = before.iter().filter(|b| **b == 3).count() as f64;
        let changed = (moved + lost) / 65537.0;
        assert!(changed <= 0.15, "changed {changed}");
        assert!(after.iter().all(|v| *v != 3 && *v != NO_BACKEND));
    }

    #[test]
    fn same_input_same_table_and_order_does_not_matter() {
        let e = entries(17, |i| 1 + i % 3);
        assert_eq!(build(&e, 65537), build(&e, 65537));
        let mut r = e.clone();
        r.reverse();
        assert_eq!(build(&e, 65537), build(&r, 65537));
    }

    #[test]
    fn other_slot_numbers_give_the_same_backend_at_every_position() {
        // Two balancers of an ECMP group: same backends and weights, other slot values
        // (their own backend arrays) and another input order.
        let a = entries(7, |i| 1 + i % 2);
        let mut b: Vec<Entry> = a
            .iter()
            .map(|e| Entry {
                value: 1000 - e.value * 3,
                ..e.clone()
            })
            .collect();
        b.rotate_left(3);
        let name_of = |es: &[Entry], t: Vec<u32>| -> Vec<String> {
            t.into_iter()
                .map(|v| {
                    es.iter()
                        .find(|e| e.value == v)
                        .map(|e| e.name.clone())
                        .unwrap_or_default()
                })
                .collect()
        };
        let ta = name_of(&a, build(&a, 65537));
        let tb = name_of(&b, build(&b, 65537));
        assert!(ta.iter().all(|n| !n.is_empty()));
        assert!(ta == tb, "the same backend at every ring position");
    }

    #[test]
    fn empty_and_zero_weight_tables_have_no_backend() {
        assert!(build(&[], 13).iter().all(|v| *v == NO_BACKEND));
        assert!(
            build(&entries(3, |_| 0), 13)
                .iter()
                .all(|v| *v == NO_BACKEND)
        );
        let t = build(&entries(3, |i| (i == 1) as u32), 13);
        assert!(t.iter().all(|v| *v == 1));
    }

    #[test]
    fn primes() {
        assert!(is_prime(65537));
        assert!(is_prime(13));
        assert!(!is_prime(65536));
        assert!(!is_prime(1));
    }
}
