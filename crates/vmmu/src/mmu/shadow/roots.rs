//! A vCPU's shadow roots (KVM's `mmu_alloc_shadow_roots`,
//! `mmu_alloc_direct_roots` for paging off, `kvm_mmu_free_roots`).
//!
//! The hardware model always walks 4- or 5-level IA-32e tables, as KVM's
//! hardware does on a 64-bit host (with NX and CR0.WP forced on):
//! - a 4- or 5-level guest gets one root page, shadowing its CR3 table;
//! - a PAE, 32-bit or paging-off guest gets four level-2 root pages (one
//!   per PDPTE register; for a 32-bit guest the four quarters of its page
//!   directory by quadrant; with paging off four direct pages covering
//!   4 GiB), linked from a vCPU-owned PDPT ("pae_root") under a vCPU-owned
//!   PML4 ("pml4_root"), as KVM does for 32-bit guests under 64-bit NPT.
//!
//! A root page counts its users (`root_count`); a root zapped while in use
//! stays allocated, invalid, until its last user releases it.

use std::sync::atomic::Ordering;

use super::page::{PageId, SptePtr};
use super::role::{GuestContext, Role};
use super::{ShadowError, ShadowMmu};
use crate::addr::{Gfn, Gva, Level, Pfn};
use crate::arch::control::{CR3_32_ROOT_MASK, CR3_LM_ROOT_MASK, PagingMode};
use crate::arch::pte::{PT_PRESENT, PT64_ADDR_MASK};
use crate::mmu::cache::MmuMemoryCache;
use crate::mmu::stats::MmuStats;

/// What the vCPU's hardware root is.
#[derive(Debug)]
enum RootKind {
    /// One root page (4- and 5-level guests).
    Table(PageId),
    /// The vCPU's PML4 and PDPT over four level-2 roots.
    Pae {
        pml4: Pfn,
        pae: Pfn,
        roots: [Option<PageId>; 4],
    },
}

/// The roots one vCPU runs on. Release them with
/// [`ShadowMmu::release_roots`] (dropping them leaks the reference).
#[derive(Debug)]
#[must_use = "roots must be released with ShadowMmu::release_roots"]
pub struct ShadowRoots {
    /// The role of the root page(s) (for PAE-format roots, the first
    /// one's; their quadrants are their own).
    role: Role,
    as_id: u16,
    generation: u64,
    hw_root: Pfn,
    levels: u8,
    kind: RootKind,
}

impl ShadowRoots {
    /// The role of the root page (KVM's `root_role` of the root).
    pub fn role(&self) -> Role {
        self.role
    }

    /// The address space.
    pub fn as_id(&self) -> u16 {
        self.as_id
    }

    /// The zap-all generation these roots were loaded in.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The frame of the table the hardware walk starts from.
    pub fn hw_root(&self) -> Pfn {
        self.hw_root
    }

    /// Levels of the hardware walk (4 or 5).
    pub fn levels(&self) -> u8 {
        self.levels
    }

    /// The root pages.
    pub(super) fn pages(&self) -> impl Iterator<Item = PageId> + '_ {
        let (one, four) = match &self.kind {
            RootKind::Table(id) => (Some(*id), [None; 4]),
            RootKind::Pae { roots, .. } => (None, *roots),
        };
        one.into_iter().chain(four.into_iter().flatten())
    }

    /// The root page whose tree translates `gva`.
    pub(super) fn root_for(&self, gva: Gva) -> PageId {
        self.try_root_for(gva)
            .expect("the guest walk went through a present PDPTE")
    }

    /// The root page whose tree translates `gva`, if any (a PAE guest's
    /// PDPTE may be not present).
    pub(super) fn try_root_for(&self, gva: Gva) -> Option<PageId> {
        match &self.kind {
            RootKind::Table(id) => Some(*id),
            RootKind::Pae { roots, .. } => roots[((gva.raw() >> 30) & 3) as usize],
        }
    }
}

impl ShadowMmu {
    /// Loads the roots for a vCPU in guest context `ctx` with `cr3` (and,
    /// in PAE paging, the PDPTE registers `pdptes`): KVM's `kvm_mmu_load`.
    ///
    /// `tables` is the vCPU's cache of table frames, topped up here before
    /// `mmu_lock` with every frame the roots may need.
    pub fn load_roots(
        &self,
        ctx: &GuestContext,
        as_id: u16,
        cr3: u64,
        pdptes: [u64; 4],
        tables: &mut MmuMemoryCache,
    ) -> Result<ShadowRoots, ShadowError> {
        MmuStats::inc(&self.stats.local().prev_roots_miss);
        // Four PAE roots and the vCPU's PML4 and PDPT above them at most.
        tables.topup(6)?;
        let mut guard = self.lock.write();
        let pages = &mut *guard;
        let generation = self.valid_gen.load(Ordering::Acquire);
        // Room for up to four roots.
        let mut flush = self.reclaim(pages, super::FREE_MMU_PAGES);
        let mut get = |pages: &mut super::page::Pages, gfn: Gfn, role: Role, tables: &mut MmuMemoryCache| {
            let (id, wp) = self.get_page(pages, gfn, role, tables);
            flush |= wp;
            pages.page_mut(id).root_count += 1;
            id
        };
        let roots = match ctx.mode() {
            PagingMode::Level4 | PagingMode::Level5 => {
                let level = ctx.root_level();
                let id = get(
                    pages,
                    Gfn::new((cr3 & CR3_LM_ROOT_MASK) >> 12),
                    Role::root(ctx, level, 0),
                    tables,
                );
                ShadowRoots {
                    role: Role::root(ctx, level, 0),
                    as_id,
                    generation,
                    hw_root: pages.page(id).pfn,
                    levels: level.get(),
                    kind: RootKind::Table(id),
                }
            }
            mode => {
                let mut frame = || {
                    tables
                        .pop()
                        .expect("the cache was topped up with every frame the roots may need")
                };
                let (pml4, pae) = (frame(), frame());
                self.link_pae_table(pml4, pae);
                let mut roots = [None; 4];
                for (i, root) in roots.iter_mut().enumerate() {
                    let target = match mode {
                        PagingMode::Pae => (pdptes[i] & PT_PRESENT != 0).then(|| {
                            (
                                Gfn::new((pdptes[i] & PT64_ADDR_MASK) >> 12),
                                Role::root(ctx, Level::L2, 0),
                            )
                        }),
                        PagingMode::Bits32 => Some((
                            Gfn::new((cr3 & CR3_32_ROOT_MASK) >> 12),
                            Role::root(ctx, Level::L2, i as u8),
                        )),
                        _ => Some((Gfn::new((i as u64) << 18), Role::root(ctx, Level::L2, 0))),
                    };
                    if let Some((gfn, role)) = target {
                        let id = get(pages, gfn, role, tables);
                        let ptr = SptePtr {
                            table: pae,
                            index: i as u16,
                        };
                        // Into the fresh PAE table: nothing was there.
                        self.link(pages, ptr, Level::L3, id).waive("the entry was empty");
                        *root = Some(id);
                    }
                }
                ShadowRoots {
                    role: Role::root(ctx, Level::L2, 0),
                    as_id,
                    generation,
                    hw_root: pml4,
                    levels: 4,
                    kind: RootKind::Pae { pml4, pae, roots },
                }
            }
        };
        self.discharge(flush);
        Ok(roots)
    }

    /// Releases a vCPU's roots (KVM's `kvm_mmu_free_roots`): an invalid
    /// root page whose last user this was is freed.
    pub fn release_roots(&self, roots: ShadowRoots) {
        let mut guard = self.lock.write();
        let pages = &mut *guard;
        for id in roots.pages() {
            let p = pages.page_mut(id);
            p.root_count -= 1;
            if let RootKind::Pae { pae, .. } = roots.kind {
                p.parents.retain(|ptr| ptr.table != pae);
            }
            let p = pages.page(id);
            if p.root_count == 0 && p.invalid {
                self.free_page(pages, id);
            }
        }
        if let RootKind::Pae { pml4, pae, .. } = roots.kind {
            self.defer_free(vec![pml4, pae]);
        }
    }

    /// Whether `roots` were made obsolete by a zap-all whose announcement
    /// a vCPU that has seen root generation `seen` has acknowledged
    /// (lockless; an isolation check of the hardware model: such a vCPU
    /// must have dropped them). Sound, not complete: only the last
    /// zap-all's announcement is kept.
    pub fn roots_obsolete_by_acknowledged_zap(&self, roots: &ShadowRoots, seen: u64) -> bool {
        let done = self.zap_all_done.load(Ordering::Acquire);
        let (valid, announced) = (done >> 32, done & 0xffff_ffff);
        // Past 2^32 generations the packed numbers wrap: no verdict.
        seen < 1 << 32 && roots.generation() < valid && seen >= announced
    }

    /// Whether `roots` must be reloaded (zapped, or a zap-all happened).
    pub fn roots_obsolete(&self, roots: &ShadowRoots) -> bool {
        let pages = self.lock.read();
        !self.roots_valid(&pages, roots)
    }
}
