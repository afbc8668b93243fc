//! Builds the IPv4 range index the programs search (`passthrough_common::range_covers`).
//!
//! Pure: no IO. Each (rule set, port) table is the sorted list of disjoint intervals its CIDRs
//! cover, laid out as a static search tree of 64-byte blocks. The blocks of every table of one
//! generation form one contiguous image that the loader copies into its half of the
//! `RANGES_V4` array; the table descriptors go into `RANGE_INDEX_V4`.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use passthrough_common::{
    RANGE_FANOUT, RANGE_MAX_LEVELS, RangeBlock, RangeTable, RangeTableKey, range_covers,
};

/// Intervals one table can hold: the search tree has at most [`RANGE_MAX_LEVELS`] levels.
pub const MAX_INTERVALS: usize = RANGE_FANOUT.pow(RANGE_MAX_LEVELS as u32);

/// Every IPv4 table of one plan, with block offsets relative to the image's first block.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeImage {
    /// The blocks of every table, back to back.
    pub blocks: Vec<RangeBlock>,
    /// Table descriptors, sorted by key.
    pub tables: Vec<(RangeTableKey, RangeTable)>,
    /// A table needed more than [`MAX_INTERVALS`] intervals; it was left empty (so it covers
    /// nothing) and the loader refuses the plan.
    pub overflow: bool,
}

impl RangeImage {
    /// Adds the table of `key` covering `nets`. Keys must be pushed in ascending order; a table
    /// with no networks is not stored (no descriptor = nothing covered).
    pub fn push_table(&mut self, key: RangeTableKey, nets: impl IntoIterator<Item = Ipv4Net>) {
        debug_assert!(
            self.tables.last().is_none_or(|(k, _)| *k < key),
            "tables pushed out of order"
        );
        let intervals = merged_intervals(nets);
        if intervals.is_empty() {
            return;
        }
        if intervals.len() > MAX_INTERVALS {
            self.overflow = true;
            return;
        }
        let table = build_table(&intervals, &mut self.blocks);
        self.tables.push((key, table));
    }

    /// The descriptor of one table.
    pub fn table(&self, key: RangeTableKey) -> Option<&RangeTable> {
        self.tables
            .binary_search_by_key(&key, |(k, _)| *k)
            .ok()
            .map(|i| &self.tables[i].1)
    }

    /// Whether the table of `key` covers `addr`, searched exactly as the programs search it.
    pub fn covers(&self, key: RangeTableKey, addr: Ipv4Addr) -> bool {
        self.table(key)
            .is_some_and(|t| range_covers(t, u32::from(addr), |i| self.blocks.get(i as usize)))
    }

    /// The descriptors with every block offset moved by `offset` (the generation's half).
    pub fn rebased(&self, offset: u32) -> impl Iterator<Item = (RangeTableKey, RangeTable)> + '_ {
        self.tables.iter().map(move |(k, t)| {
            let mut t = *t;
            t.ends += offset;
            for l in 0..t.levels as usize {
                t.base[l] += offset;
            }
            (*k, t)
        })
    }
}

/// The sorted, disjoint, non-adjacent intervals `[start, end]` the networks cover.
fn merged_intervals(nets: impl IntoIterator<Item = Ipv4Net>) -> Vec<(u32, u32)> {
    let mut v: Vec<(u32, u32)> = nets
        .into_iter()
        .map(|n| (u32::from(n.network()), u32::from(n.broadcast())))
        .collect();
    // Plans push each table's networks in order already (a cheap check then); sort otherwise.
    if !v.is_sorted() {
        v.sort_unstable();
    }
    let mut out: Vec<(u32, u32)> = Vec::with_capacity(v.len());
    for (start, end) in v {
        match out.last_mut() {
            // Overlapping or adjacent: one interval (saturating: an interval ending at
            // 255.255.255.255 absorbs everything after it).
            Some(last) if start <= last.1.saturating_add(1) => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    out
}

/// Appends one table's levels (top first) and ends to `blocks`.
fn build_table(intervals: &[(u32, u32)], blocks: &mut Vec<RangeBlock>) -> RangeTable {
    // Bottom-up: the leaves are the starts; each level above holds the first key of every
    // block of the level below.
    let mut levels: Vec<Vec<u32>> = vec![intervals.iter().map(|i| i.0).collect()];
    while levels.last().expect("one level").len() > RANGE_FANOUT {
        let up = levels
            .last()
            .expect("one level")
            .iter()
            .step_by(RANGE_FANOUT)
            .copied()
            .collect();
        levels.push(up);
    }
    levels.reverse();
    let mut table = RangeTable {
        levels: levels.len() as u32,
        ..RangeTable::default()
    };
    for (l, keys) in levels.iter().enumerate() {
        table.base[l] = blocks.len() as u32;
        table.len[l] = keys.len() as u32;
        push_blocks(blocks, keys, u32::MAX);
    }
    table.ends = blocks.len() as u32;
    let ends: Vec<u32> = intervals.iter().map(|i| i.1).collect();
    push_blocks(blocks, &ends, 0);
    table
}

fn push_blocks(blocks: &mut Vec<RangeBlock>, keys: &[u32], pad: u32) {
    for chunk in keys.chunks(RANGE_FANOUT) {
        let mut b = RangeBlock {
            keys: [pad; RANGE_FANOUT],
        };
        b.keys[..chunk.len()].copy_from_slice(chunk);
        blocks.push(b);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn key(port: u32) -> RangeTableKey {
        RangeTableKey { ruleset: 7, port }
    }

    fn image(nets: &[Ipv4Net]) -> RangeImage {
        let mut img = RangeImage::default();
        img.push_table(key(0), nets.iter().copied());
        img
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn edges_of_the_address_space() {
        let img = image(&[net("0.0.0.0/32"), net("255.255.255.255/32")]);
        assert!(img.covers(key(0), Ipv4Addr::new(0, 0, 0, 0)));
        assert!(!img.covers(key(0), Ipv4Addr::new(0, 0, 0, 1)));
        assert!(!img.covers(key(0), Ipv4Addr::new(255, 255, 255, 254)));
        assert!(img.covers(key(0), Ipv4Addr::BROADCAST));
        let all = image(&[net("0.0.0.0/0")]);
        assert!(
            all.covers(key(0), Ipv4Addr::BROADCAST) && all.covers(key(0), Ipv4Addr::UNSPECIFIED)
        );
        assert!(
            !all.covers(key(1), Ipv4Addr::UNSPECIFIED),
            "another port's table does not exist"
        );
    }

    #[test]
    fn overlapping_and_adjacent_networks_merge() {
        let img = image(&[
            net("10.0.0.0/8"),
            net("10.1.0.0/16"),
            net("11.0.0.0/8"),
            net("13.0.0.0/8"),
        ]);
        assert_eq!(
            img.tables[0].1.len[0], 2,
            "10/8 + 11/8 are one interval, 13/8 another"
        );
        assert!(img.covers(key(0), Ipv4Addr::new(11, 255, 255, 255)));
        assert!(!img.covers(key(0), Ipv4Addr::new(12, 0, 0, 0)));
    }

    #[test]
    fn broadcast_with_padded_levels_picks_the_last_interval() {
        // 17 intervals: two levels, the last blocks padded with u32::MAX.
        let nets: Vec<Ipv4Net> = (0..17u32)
            .map(|i| Ipv4Net::new(Ipv4Addr::from(i << 9), 24).unwrap())
            .collect();
        let img = image(&nets);
        assert_eq!(img.tables[0].1.levels, 2);
        assert!(!img.covers(key(0), Ipv4Addr::BROADCAST));
        let mut with_top = nets.clone();
        with_top.push(net("255.255.255.0/24"));
        assert!(image(&with_top).covers(key(0), Ipv4Addr::BROADCAST));
    }

    #[test]
    fn a_million_intervals_take_five_levels() {
        let nets: Vec<Ipv4Net> = (0..1_000_000u32)
            .map(|i| Ipv4Net::new(Ipv4Addr::from(i << 4), 30).unwrap())
            .collect();
        let img = image(&nets);
        let t = img.tables[0].1;
        assert_eq!(t.levels, 5);
        assert_eq!(t.len[4], 1_000_000);
        for i in [0u32, 1, 15, 16, 4095, 4096, 65_535, 999_999] {
            let base = i << 4;
            assert!(img.covers(key(0), Ipv4Addr::from(base + 3)), "{i}");
            assert!(!img.covers(key(0), Ipv4Addr::from(base + 4)), "{i}");
        }
    }

    fn arb_net() -> impl Strategy<Value = Ipv4Net> {
        // Clustered addresses so that networks overlap, nest and touch often.
        (0u32..64, 0u32..=0xffff, 0u8..=32).prop_map(|(hi, lo, len)| {
            let addr = (hi << 26) | (lo << 4) | (lo & 0xf);
            Ipv4Net::new(Ipv4Addr::from(addr), len.max(if hi == 0 { 0 } else { 4 }))
                .unwrap()
                .trunc()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn covers_exactly_what_the_networks_contain(
            nets in prop::collection::vec(arb_net(), 0..300),
            probes in prop::collection::vec(any::<u32>(), 0..64),
        ) {
            let img = image(&nets);
            // Probe every network's edges and their neighbours, plus random addresses.
            let mut addrs: Vec<u32> = probes;
            for n in &nets {
                let (s, e) = (u32::from(n.network()), u32::from(n.broadcast()));
                addrs.extend([s, e, s.wrapping_sub(1), e.wrapping_add(1)]);
            }
            addrs.extend([0, u32::MAX]);
            for a in addrs {
                let ip = Ipv4Addr::from(a);
                let expected = nets.iter().any(|n| n.contains(&ip));
                prop_assert_eq!(img.covers(key(0), ip), expected, "{} in {:?}", ip, nets);
            }
        }
    }
}
