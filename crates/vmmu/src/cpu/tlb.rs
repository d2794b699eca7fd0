//! The TLB model: what a processor may cache of a translation, and exactly
//! what each invalidation removes (SDM vol. 3A 4.10, vol. 3C 29.4).
//!
//! An entry maps one linear page (4 KiB, 2 MiB, 4 MiB or 1 GiB) straight to a
//! host-physical page, tagged by the address space it was made in: VPID,
//! EPTP (for TDP) and PCID. Entries made from a leaf with G = 1 while
//! CR4.PGE = 1 are global: they match every PCID. The TLB caches the
//! *rights* of the translation, not the decision: every hit is checked
//! against the current CR0.WP, CR4.SMEP/SMAP, RFLAGS.AC and PKRU by the
//! caller, and a hit that would fault, or a write through an entry cached
//! from a clean leaf, is dropped and walked again (as processors do).
//!
//! Like a processor's, the TLB has two levels. The second level above is
//! the architectural one: set-associative, one array per page size, with
//! the invalidation rules. In front of it sits a small direct-mapped first
//! level ([`Tlb::lookup_l1`]) that holds 4 KiB pieces of second-level
//! entries together with the *decisions* for each access class under the
//! control registers and PKRU of the time they were filled. It is
//! inclusive and conservative: every change of the second level (insert,
//! remove, any flush) empties it in O(1), and so does the vCPU on every
//! change of the state the decisions depend on ([`Tlb::clear_l1`]). A
//! first-level hit is therefore always a hit the second level would give,
//! with the same outcome; it only skips the set scan and the rights check.
//!
//! Paging-structure caches are not modelled: every miss walks from the
//! root. That is a legal implementation (the SDM never requires caching),
//! and every flush below removes at least what the SDM requires.

use crate::addr::{Hpa, PageSize};
use crate::arch::perm::{Access, AccessKind, AccessRights, Privilege};

/// Page sizes a TLB entry can have, each with its own array.
const SIZES: [PageSize; 4] = [PageSize::Size4K, PageSize::Size2M, PageSize::Size4M, PageSize::Size1G];

fn size_index(size: PageSize) -> usize {
    match size {
        PageSize::Size4K => 0,
        PageSize::Size2M => 1,
        PageSize::Size4M => 2,
        PageSize::Size1G => 3,
    }
}

/// The address-space tag of a translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct TlbTag {
    /// VPID (0 = the host / no VPID).
    pub vpid: u16,
    /// EPTP root tag for TDP translations (0 without EPT).
    pub eptp: u64,
    /// PCID (0 when CR4.PCIDE = 0).
    pub pcid: u16,
}

/// One cached translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlbEntry {
    /// Linear address of the page (aligned to its size).
    pub va_base: u64,
    /// Page size.
    pub size: PageSize,
    /// Address-space tag.
    pub tag: TlbTag,
    /// Global: matches every PCID of the same VPID/EPTP.
    pub global: bool,
    /// Host-physical address of the page (aligned to its size).
    pub hpa_base: Hpa,
    /// Guest-physical address of the page, for checks and exits.
    pub gpa_base: u64,
    /// Effective rights (guest ∧ MMU).
    pub rights: AccessRights,
    /// Protection key of the guest leaf.
    pub pkey: u8,
    /// Whether the guest leaf (and the SPTE) were dirty when cached: a
    /// write through a clean entry must walk to set D.
    pub dirty: bool,
}

impl TlbEntry {
    /// The host-physical address of `va` through this entry.
    #[inline]
    pub fn hpa(&self, va: u64) -> Hpa {
        Hpa::new(self.hpa_base.raw() + (va & (self.size.bytes() - 1)))
    }

    /// The guest-physical address of `va` through this entry.
    #[inline]
    pub fn gpa(&self, va: u64) -> u64 {
        self.gpa_base + (va & (self.size.bytes() - 1))
    }

    #[inline]
    fn matches(&self, va: u64, tag: TlbTag) -> bool {
        self.va_base == va & !(self.size.bytes() - 1)
            && self.tag.vpid == tag.vpid
            && self.tag.eptp == tag.eptp
            && (self.global || self.tag.pcid == tag.pcid)
    }
}

/// TLB geometry: per page size, `sets` × `ways` entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlbConfig {
    /// Sets per page-size array (a power of two).
    pub sets: usize,
    /// Ways per set.
    pub ways: usize,
}

impl Default for TlbConfig {
    /// 64 sets × 8 ways (512 entries) per size: a second-level TLB.
    fn default() -> Self {
        TlbConfig { sets: 64, ways: 8 }
    }
}

/// Counters of TLB activity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlbStats {
    /// Lookups that hit.
    pub hits: u64,
    /// Lookups that missed.
    pub misses: u64,
    /// Entries evicted by replacement.
    pub evictions: u64,
    /// Invalidation operations performed.
    pub flushes: u64,
}

/// Entries of the first level (direct-mapped by the 4 KiB page number).
const L1_ENTRIES: usize = 64;

/// One first-level entry: a 4 KiB page of a second-level entry, with the
/// decision for each access class (bit [`access_class`]) made when filled.
#[derive(Clone, Copy, Debug, Default)]
struct L1Entry {
    /// The 4 KiB linear page number.
    vpn: u64,
    /// The tag of the lookup that filled it.
    tag: TlbTag,
    /// The TLB generation it was filled in: stale once the TLB changed.
    generation: u64,
    /// Host-physical address of the 4 KiB page.
    hpa: u64,
    /// Guest-physical address of the 4 KiB page.
    gpa: u64,
    /// Access classes allowed, one bit each.
    allowed: u16,
}

/// A first-level hit: where the access goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L1Hit {
    /// Host-physical address of the byte accessed.
    pub hpa: Hpa,
    /// Guest-physical address of the byte accessed.
    pub gpa: u64,
}

/// The class of an explicit access, as the first level keys its decisions:
/// kind × user/supervisor × RFLAGS.AC (12 classes). Implicit supervisor
/// accesses have none: they always take the second level.
#[inline]
pub fn access_class(access: Access) -> Option<u32> {
    let kind = match access.kind {
        AccessKind::Read => 0,
        AccessKind::Write => 1,
        AccessKind::Fetch => 2,
    };
    let user = match access.privilege {
        Privilege::User => 1,
        Privilege::Supervisor => 0,
        Privilege::ImplicitSupervisor => return None,
    };
    Some(kind * 4 + user * 2 + u32::from(access.rflags_ac))
}

/// A set-associative TLB, one array per page size, round-robin replacement,
/// with a direct-mapped first level in front.
#[derive(Clone, Debug)]
pub struct Tlb {
    config: TlbConfig,
    arrays: [Vec<Option<TlbEntry>>; 4],
    /// Valid entries per array: a flush skips the empty ones (most
    /// guests leave the huge-page arrays empty).
    used: [usize; 4],
    next_victim: [Vec<u8>; 4],
    l1: Box<[L1Entry; L1_ENTRIES]>,
    /// Bumped by every change: first-level entries of an older
    /// generation are empty.
    generation: u64,
    stats: TlbStats,
}

/// What an invalidation removes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flush {
    /// INVLPG `va`: the page's translations for the current VPID/EPTP and
    /// PCID, and its global translations.
    Page {
        /// The linear address.
        va: u64,
        /// The current tag.
        tag: TlbTag,
    },
    /// INVPCID type 0: `va`'s non-global translations for `pcid`.
    PcidPage {
        /// The linear address.
        va: u64,
        /// The tag, with the descriptor's PCID.
        tag: TlbTag,
    },
    /// MOV to CR3 without no-flush / INVPCID type 1: all non-global
    /// translations of the tag's PCID.
    Pcid(TlbTag),
    /// INVPCID type 3: all non-global translations of every PCID of the
    /// tag's VPID/EPTP.
    AllNonGlobal(TlbTag),
    /// INVPCID type 2, a CR4.PGE or PCIDE change, CR0.PG changes: all
    /// translations of the tag's VPID/EPTP, global ones included.
    All(TlbTag),
    /// INVVPID type 0 (individual address): `va`'s translations of one
    /// VPID, every PCID and EPTP, global ones included.
    VpidPage {
        /// The VPID.
        vpid: u16,
        /// The linear address.
        va: u64,
    },
    /// INVVPID type 1 (single context): everything of one VPID.
    Vpid(u16),
    /// INVVPID type 3 (single context, retaining globals): the non-global
    /// translations of one VPID.
    VpidNonGlobal(u16),
    /// INVEPT (single context): everything made through one EPTP.
    Eptp(u64),
    /// INVEPT/INVVPID all-context, or a vCPU reset: everything.
    Everything,
}

impl Tlb {
    /// An empty TLB with the given geometry.
    ///
    /// # Panics
    /// If `sets` is not a power of two or `ways` is 0 or above 255 (a
    /// configuration error, rejected before a TLB is built by callers that
    /// take user input).
    pub fn new(config: TlbConfig) -> Tlb {
        assert!(config.sets.is_power_of_two(), "TLB sets must be a power of two");
        assert!((1..=255).contains(&config.ways), "TLB ways must be 1..=255");
        let n = config.sets * config.ways;
        Tlb {
            config,
            arrays: std::array::from_fn(|_| vec![None; n]),
            used: [0; 4],
            next_victim: std::array::from_fn(|_| vec![0; config.sets]),
            l1: Box::new([L1Entry::default(); L1_ENTRIES]),
            generation: 1,
            stats: TlbStats::default(),
        }
    }

    /// The first level's translation of `va` under `tag`, if it holds one
    /// that allows access class `class` (see [`access_class`]).
    #[inline]
    pub fn lookup_l1(&mut self, va: u64, tag: TlbTag, class: u32) -> Option<L1Hit> {
        let vpn = va >> 12;
        let e = &self.l1[vpn as usize % L1_ENTRIES];
        if e.generation == self.generation && e.vpn == vpn && e.tag == tag && e.allowed & (1 << class) != 0 {
            self.stats.hits += 1;
            return Some(L1Hit {
                hpa: Hpa::new(e.hpa | (va & 0xfff)),
                gpa: e.gpa | (va & 0xfff),
            });
        }
        None
    }

    /// Records in the first level that `entry`, which the second level just
    /// returned for `va` under `tag`, allows access class `class` (the
    /// caller checked it against the current state).
    #[inline]
    pub fn fill_l1(&mut self, va: u64, tag: TlbTag, entry: &TlbEntry, class: u32) {
        let vpn = va >> 12;
        let generation = self.generation;
        let e = &mut self.l1[vpn as usize % L1_ENTRIES];
        if e.generation == generation && e.vpn == vpn && e.tag == tag {
            e.allowed |= 1 << class;
            return;
        }
        *e = L1Entry {
            vpn,
            tag,
            generation,
            hpa: entry.hpa(va).raw() & !0xfff,
            gpa: entry.gpa(va) & !0xfff,
            allowed: 1 << class,
        };
    }

    /// Empties the first level: the state its decisions were made under
    /// (CR0.WP, CR4.SMEP/SMAP, EFER.NXE, PKRU, the paging mode) changed.
    /// The second level keeps its entries: it caches rights, not decisions.
    #[inline]
    pub fn clear_l1(&mut self) {
        self.generation += 1;
    }

    /// The geometry.
    pub fn config(&self) -> TlbConfig {
        self.config
    }

    /// Activity counters.
    pub fn stats(&self) -> TlbStats {
        self.stats
    }

    #[inline]
    fn set_range(&self, size: PageSize, va: u64) -> std::ops::Range<usize> {
        let vpn = va / size.bytes();
        let set = (vpn as usize) & (self.config.sets - 1);
        set * self.config.ways..(set + 1) * self.config.ways
    }

    /// The translation of `va` under `tag`, if cached.
    #[inline]
    pub fn lookup(&mut self, va: u64, tag: TlbTag) -> Option<TlbEntry> {
        for (i, size) in SIZES.iter().enumerate() {
            let range = self.set_range(*size, va);
            for e in self.arrays[i][range].iter().flatten() {
                if e.matches(va, tag) {
                    self.stats.hits += 1;
                    return Some(*e);
                }
            }
        }
        self.stats.misses += 1;
        None
    }

    /// Caches a translation, replacing any entry for the same page and tag.
    pub fn insert(&mut self, entry: TlbEntry) {
        self.generation += 1;
        let i = size_index(entry.size);
        let range = self.set_range(entry.size, entry.va_base);
        let set = range.start / self.config.ways;
        let ways = &mut self.arrays[i][range];
        let slot = ways
            .iter()
            .position(|e| e.is_some_and(|e| e.va_base == entry.va_base && e.tag == entry.tag))
            .or_else(|| ways.iter().position(Option::is_none));
        match slot {
            Some(s) => {
                if ways[s].replace(entry).is_none() {
                    self.used[i] += 1;
                }
            }
            None => {
                let v = &mut self.next_victim[i][set];
                ways[*v as usize] = Some(entry);
                *v = ((*v as usize + 1) % self.config.ways) as u8;
                self.stats.evictions += 1;
            }
        }
    }

    /// Removes one entry that was found stale by its user (a hit whose
    /// rights fault, or a write through a clean entry).
    pub fn remove(&mut self, va: u64, tag: TlbTag) {
        self.generation += 1;
        for (i, size) in SIZES.iter().enumerate() {
            let range = self.set_range(*size, va);
            for e in &mut self.arrays[i][range] {
                if e.is_some_and(|x| x.matches(va, tag)) {
                    *e = None;
                    self.used[i] -= 1;
                }
            }
        }
    }

    /// Performs an invalidation.
    pub fn flush(&mut self, flush: Flush) {
        self.stats.flushes += 1;
        self.generation += 1;
        let same_space = |e: &TlbEntry, t: &TlbTag| e.tag.vpid == t.vpid && e.tag.eptp == t.eptp;
        let in_page = |e: &TlbEntry, va: u64| e.va_base == va & !(e.size.bytes() - 1);
        let removes = |e: &TlbEntry| match &flush {
            Flush::Page { va, tag } => in_page(e, *va) && same_space(e, tag) && (e.global || e.tag.pcid == tag.pcid),
            Flush::PcidPage { va, tag } => in_page(e, *va) && same_space(e, tag) && !e.global && e.tag.pcid == tag.pcid,
            Flush::Pcid(tag) => same_space(e, tag) && !e.global && e.tag.pcid == tag.pcid,
            Flush::AllNonGlobal(tag) => same_space(e, tag) && !e.global,
            Flush::All(tag) => same_space(e, tag),
            Flush::VpidPage { vpid, va } => in_page(e, *va) && e.tag.vpid == *vpid,
            Flush::Vpid(vpid) => e.tag.vpid == *vpid,
            Flush::VpidNonGlobal(vpid) => e.tag.vpid == *vpid && !e.global,
            Flush::Eptp(eptp) => e.tag.eptp == *eptp,
            Flush::Everything => true,
        };
        let drop_matching = |slots: &mut [Option<TlbEntry>], used: &mut usize| {
            for slot in slots {
                if slot.as_ref().is_some_and(removes) {
                    *slot = None;
                    *used -= 1;
                }
            }
        };
        let page = match flush {
            Flush::Page { va, .. } | Flush::PcidPage { va, .. } | Flush::VpidPage { va, .. } => Some(va),
            _ => None,
        };
        for (i, size) in SIZES.iter().enumerate() {
            if self.used[i] == 0 {
                continue;
            }
            // A page flush only needs the sets that can hold the page.
            let range = page.map_or(0..self.arrays[i].len(), |va| self.set_range(*size, va));
            drop_matching(&mut self.arrays[i][range], &mut self.used[i]);
        }
    }

    /// Number of valid entries.
    pub fn len(&self) -> usize {
        debug_assert_eq!(
            self.used.iter().sum::<usize>(),
            self.arrays.iter().map(|a| a.iter().flatten().count()).sum::<usize>(),
            "the per-array counts match the entries"
        );
        self.used.iter().sum()
    }

    /// Whether no entry is valid.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every valid entry (for checkers).
    pub fn entries(&self) -> impl Iterator<Item = &TlbEntry> {
        self.arrays.iter().flat_map(|a| a.iter().flatten())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::perm::{Access, AccessKind};

    fn tag(pcid: u16) -> TlbTag {
        TlbTag { vpid: 1, eptp: 0, pcid }
    }

    fn entry(va: u64, size: PageSize, pcid: u16, global: bool) -> TlbEntry {
        TlbEntry {
            va_base: va & !(size.bytes() - 1),
            size,
            tag: tag(pcid),
            global,
            hpa_base: Hpa::new(0x10_0000_0000 + (va & !(size.bytes() - 1))),
            gpa_base: va & !(size.bytes() - 1),
            rights: AccessRights::all(),
            pkey: 0,
            dirty: true,
        }
    }

    #[test]
    fn lookup_finds_every_page_size() {
        let mut t = Tlb::new(TlbConfig::default());
        t.insert(entry(0x1000, PageSize::Size4K, 1, false));
        t.insert(entry(0x4020_0000, PageSize::Size2M, 1, false));
        t.insert(entry(0x8000_0000, PageSize::Size1G, 1, false));
        assert_eq!(t.lookup(0x1abc, tag(1)).unwrap().hpa(0x1abc), Hpa::new(0x10_0000_1abc));
        assert!(t.lookup(0x4020_0000 + 0x1f_ffff, tag(1)).is_some());
        assert!(t.lookup(0x8000_0000 + 0x3fff_ffff, tag(1)).is_some());
        assert!(t.lookup(0x2000, tag(1)).is_none());
        assert_eq!(t.stats().hits, 3);
    }

    #[test]
    fn pcids_are_separate_but_globals_are_shared() {
        let mut t = Tlb::new(TlbConfig::default());
        t.insert(entry(0x1000, PageSize::Size4K, 1, false));
        t.insert(entry(0x5000, PageSize::Size4K, 1, true));
        assert!(t.lookup(0x1000, tag(2)).is_none(), "non-global entries are per PCID");
        assert!(t.lookup(0x5000, tag(2)).is_some(), "global entries match every PCID");
        // Another VPID never matches, global or not.
        let other = TlbTag { vpid: 2, ..tag(1) };
        assert!(t.lookup(0x5000, other).is_none());
    }

    #[test]
    fn mov_cr3_keeps_globals_and_other_pcids() {
        let mut t = Tlb::new(TlbConfig::default());
        t.insert(entry(0x1000, PageSize::Size4K, 1, false));
        t.insert(entry(0x2000, PageSize::Size4K, 2, false));
        t.insert(entry(0x3000, PageSize::Size4K, 1, true));
        t.flush(Flush::Pcid(tag(1)));
        assert!(t.lookup(0x1000, tag(1)).is_none());
        assert!(t.lookup(0x2000, tag(2)).is_some());
        assert!(t.lookup(0x3000, tag(1)).is_some());
    }

    #[test]
    fn invlpg_removes_the_page_and_its_global_translation() {
        let mut t = Tlb::new(TlbConfig::default());
        t.insert(entry(0x1000, PageSize::Size4K, 1, false));
        t.insert(entry(0x1000, PageSize::Size4K, 2, false));
        t.insert(entry(0x4000_0000, PageSize::Size2M, 2, true));
        t.flush(Flush::Page {
            va: 0x1000,
            tag: tag(1),
        });
        assert!(t.lookup(0x1000, tag(1)).is_none());
        assert!(t.lookup(0x1000, tag(2)).is_some(), "other PCIDs may keep theirs");
        // INVLPG of any address inside a large page removes it, global too.
        t.flush(Flush::Page {
            va: 0x4012_3000,
            tag: tag(1),
        });
        assert!(t.lookup(0x4000_0000, tag(2)).is_none());
    }

    #[test]
    fn invpcid_types() {
        let mut t = Tlb::new(TlbConfig::default());
        let fill = |t: &mut Tlb| {
            t.insert(entry(0x1000, PageSize::Size4K, 1, false));
            t.insert(entry(0x2000, PageSize::Size4K, 2, false));
            t.insert(entry(0x3000, PageSize::Size4K, 1, true));
        };
        fill(&mut t);
        t.flush(Flush::PcidPage {
            va: 0x3000,
            tag: tag(1),
        });
        assert!(t.lookup(0x3000, tag(1)).is_some(), "type 0 keeps global translations");
        t.flush(Flush::PcidPage {
            va: 0x1000,
            tag: tag(1),
        });
        assert!(t.lookup(0x1000, tag(1)).is_none());
        fill(&mut t);
        t.flush(Flush::AllNonGlobal(tag(0)));
        assert_eq!(t.len(), 1, "type 3 keeps only globals");
        fill(&mut t);
        t.flush(Flush::All(tag(0)));
        assert!(t.is_empty(), "type 2 removes everything");
    }

    #[test]
    fn vpid_and_eptp_flushes() {
        let mut t = Tlb::new(TlbConfig::default());
        t.insert(entry(0x1000, PageSize::Size4K, 1, true));
        let mut e = entry(0x1000, PageSize::Size4K, 1, true);
        e.tag.eptp = 0x5000;
        e.tag.vpid = 3;
        t.insert(e);
        t.flush(Flush::Eptp(0x5000));
        assert_eq!(t.len(), 1);
        t.flush(Flush::Vpid(1));
        assert!(t.is_empty());
    }

    #[test]
    fn invvpid_individual_address_and_retaining_globals() {
        let mut t = Tlb::new(TlbConfig::default());
        let mut other_vpid = entry(0x1000, PageSize::Size4K, 1, false);
        other_vpid.tag.vpid = 2;
        let fill = |t: &mut Tlb| {
            t.insert(entry(0x1000, PageSize::Size4K, 1, true));
            t.insert(entry(0x1000, PageSize::Size4K, 7, false));
            t.insert(entry(0x4000_0000, PageSize::Size2M, 1, false));
            t.insert(other_vpid);
        };
        fill(&mut t);
        // Type 0: the page in every PCID (global included) of VPID 1; a 2M
        // entry elsewhere and VPID 2 stay.
        t.flush(Flush::VpidPage { vpid: 1, va: 0x1abc });
        assert!(t.entries().all(|e| e.va_base != 0x1000 || e.tag.vpid == 2));
        assert_eq!(t.len(), 2);
        // A huge page is removed by any address inside it.
        t.flush(Flush::VpidPage {
            vpid: 1,
            va: 0x4000_0000 + 0x0001_2345,
        });
        assert_eq!(t.len(), 1);
        t.flush(Flush::Everything);
        fill(&mut t);
        // Type 3: VPID 1 keeps its global entry only.
        t.flush(Flush::VpidNonGlobal(1));
        assert_eq!(t.len(), 2);
        assert!(t.lookup(0x1000, tag(5)).is_some_and(|e| e.global));
        assert!(t.lookup(0x1000, other_vpid.tag).is_some());
    }

    #[test]
    fn replacement_evicts_within_a_set() {
        let mut t = Tlb::new(TlbConfig { sets: 1, ways: 2 });
        for va in [0x1000, 0x2000, 0x3000] {
            t.insert(entry(va, PageSize::Size4K, 1, false));
        }
        assert_eq!(t.len(), 2);
        assert_eq!(t.stats().evictions, 1);
        assert!(t.lookup(0x3000, tag(1)).is_some(), "the newest entry is cached");
        // Re-inserting the same page replaces, never duplicates.
        t.insert(entry(0x3000, PageSize::Size4K, 1, false));
        assert_eq!(t.len(), 2);
    }

    fn class(kind: AccessKind, cpl: u8, ac: bool) -> u32 {
        access_class(Access::new(kind, cpl, ac)).expect("an explicit access")
    }

    /// The first level holds the classes it was told are allowed, for the
    /// 4 KiB page and tag it was filled for, with the second level's
    /// addresses.
    #[test]
    fn the_first_level_serves_only_what_it_was_filled_with() {
        let mut t = Tlb::new(TlbConfig::default());
        let e = entry(0x20_0000, PageSize::Size2M, 1, false);
        t.insert(e);
        let read = class(AccessKind::Read, 3, false);
        let write = class(AccessKind::Write, 3, false);
        assert_eq!(t.lookup_l1(0x20_3008, tag(1), read), None, "empty until filled");
        t.fill_l1(0x20_3008, tag(1), &e, read);
        let hit = t.lookup_l1(0x20_3010, tag(1), read).expect("the filled page and class");
        assert_eq!(hit.hpa, e.hpa(0x20_3010));
        assert_eq!(hit.gpa, e.gpa(0x20_3010));
        assert_eq!(t.lookup_l1(0x20_3010, tag(1), write), None, "another class");
        assert_eq!(
            t.lookup_l1(0x20_4010, tag(1), read),
            None,
            "another 4 KiB page of the entry"
        );
        assert_eq!(t.lookup_l1(0x20_3010, tag(2), read), None, "another PCID");
        // A second class of the same page is added, the first kept.
        t.fill_l1(0x20_3008, tag(1), &e, write);
        assert!(t.lookup_l1(0x20_3010, tag(1), read).is_some());
        assert!(t.lookup_l1(0x20_3010, tag(1), write).is_some());
        // Classes are distinct for every kind, privilege and AC.
        let all: std::collections::BTreeSet<u32> = [AccessKind::Read, AccessKind::Write, AccessKind::Fetch]
            .into_iter()
            .flat_map(|k| [(0, false), (0, true), (3, false), (3, true)].map(|(cpl, ac)| class(k, cpl, ac)))
            .collect();
        assert_eq!(all.len(), 12);
        assert!(all.iter().all(|&c| c < 16));
    }

    /// Every change of the second level, and `clear_l1`, empties the first.
    #[test]
    fn every_change_empties_the_first_level() {
        let read = class(AccessKind::Read, 0, false);
        type Change = (&'static str, fn(&mut Tlb));
        let changes: [Change; 5] = [
            ("insert elsewhere", |t| {
                t.insert(entry(0x9000, PageSize::Size4K, 1, false))
            }),
            ("remove", |t| t.remove(0x1000, tag(1))),
            ("flush of another page", |t| {
                t.flush(Flush::Page {
                    va: 0x7000,
                    tag: tag(1),
                })
            }),
            ("flush of another PCID", |t| t.flush(Flush::Pcid(tag(5)))),
            ("clear_l1", Tlb::clear_l1),
        ];
        for (what, change) in changes {
            let mut t = Tlb::new(TlbConfig::default());
            let e = entry(0x1000, PageSize::Size4K, 1, false);
            t.insert(e);
            t.fill_l1(0x1000, tag(1), &e, read);
            assert!(t.lookup_l1(0x1000, tag(1), read).is_some());
            change(&mut t);
            assert_eq!(t.lookup_l1(0x1000, tag(1), read), None, "{what}");
        }
    }
}
