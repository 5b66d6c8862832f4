//! Metadata contexts: which ones an export offers, and how queries select them.
//!
//! A small registry: [`MetaContext`] lists the kinds this server knows, each with a name and
//! a fixed id, the ids QEMU uses (`base:allocation` 0, `qemu:allocation-depth` 1,
//! `qemu:dirty-bitmap:NAME` 2 + the bitmap's index among the export's bitmaps), so that
//! traces compare. [`available`] lists an export's contexts in that order, which is also the
//! order of the replies to `NBD_OPT_LIST_META_CONTEXT`/`SET_META_CONTEXT` and of the chunks
//! of a block status reply, as in QEMU.

/// Prefix of the dirty bitmap contexts' names.
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// A metadata context this server can serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaContext {
    /// `base:allocation`: `NBD_STATE_HOLE` and `NBD_STATE_ZERO` from block status.
    BaseAllocation,
    /// `qemu:allocation-depth`: the backing chain depth that allocates each extent (0 for
    /// unallocated, 1 for the node's own layer, 2 and more for its backing files).
    AllocationDepth,
    /// `qemu:dirty-bitmap:NAME`: flag 1 (`NBD_STATE_DIRTY`) where the bitmap is dirty.
    DirtyBitmap {
        /// The bitmap's index among the export's bitmaps.
        index: u32,
        /// The bitmap's name.
        name: String,
    },
}

impl MetaContext {
    /// The context's name as sent in `NBD_REP_META_CONTEXT`.
    pub fn name(&self) -> String {
        match self {
            MetaContext::BaseAllocation => "base:allocation".to_string(),
            MetaContext::AllocationDepth => "qemu:allocation-depth".to_string(),
            MetaContext::DirtyBitmap { name, .. } => format!("{DIRTY_BITMAP_PREFIX}{name}"),
        }
    }

    /// The id sent by `NBD_OPT_SET_META_CONTEXT` and used in block status replies.
    pub fn id(&self) -> u32 {
        match self {
            MetaContext::BaseAllocation => 0,
            MetaContext::AllocationDepth => 1,
            MetaContext::DirtyBitmap { index, .. } => index.saturating_add(2),
        }
    }

    /// The namespace the context belongs to.
    fn namespace(&self) -> &'static str {
        match self {
            MetaContext::BaseAllocation => "base",
            MetaContext::AllocationDepth | MetaContext::DirtyBitmap { .. } => "qemu",
        }
    }
}

/// The contexts of an export: `base:allocation` always, `qemu:allocation-depth` if the
/// export offers it, and one `qemu:dirty-bitmap:NAME` per exported bitmap, in this order.
pub fn available<'a>(
    allocation_depth: bool,
    bitmaps: impl IntoIterator<Item = &'a str>,
) -> Vec<MetaContext> {
    let mut v = vec![MetaContext::BaseAllocation];
    if allocation_depth {
        v.push(MetaContext::AllocationDepth);
    }
    v.extend(
        bitmaps
            .into_iter()
            .enumerate()
            .map(|(i, name)| MetaContext::DirtyBitmap {
                index: u32::try_from(i).unwrap_or(u32::MAX),
                name: name.to_string(),
            }),
    );
    v
}

/// Whether the query is for listing (`NBD_OPT_LIST_META_CONTEXT`) or selecting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryMode {
    /// `NBD_OPT_LIST_META_CONTEXT`: an empty leaf is a wildcard.
    List,
    /// `NBD_OPT_SET_META_CONTEXT`: only exact names select.
    Set,
}

/// Whether `query` selects `ctx`.
fn matches(ctx: &MetaContext, query: &str, mode: QueryMode) -> bool {
    if query == ctx.name() {
        return true;
    }
    if mode == QueryMode::Set {
        // "the server MUST ignore this form during NBD_OPT_SET_META_CONTEXT" (an empty
        // leaf); QEMU likewise only expands `qemu:` and `qemu:dirty-bitmap:` when listing.
        return false;
    }
    // `base:` and `qemu:` (an empty leaf) list the whole namespace.
    if query.strip_suffix(':') == Some(ctx.namespace()) {
        return true;
    }
    // QEMU: "qemu:dirty-bitmap:" lists every exported bitmap.
    query == DIRTY_BITMAP_PREFIX && matches!(ctx, MetaContext::DirtyBitmap { .. })
}

/// The contexts of `available` that `queries` select, in registry order and without
/// duplicates. With no query, listing returns every context ("If zero queries are sent, then
/// the server MUST return all the metadata contexts that are available") and selecting
/// returns none ("If zero queries are sent, the server MUST select no metadata contexts").
/// Queries of unknown namespaces and unknown leaves are ignored: "the server MUST ignore
/// query strings belonging to an unknown namespace"; for `base:`, "If a `[leaf-name]`
/// requested by the client is not recognized, the server MUST ignore it"; QEMU ignores
/// unknown `qemu:` leaves and bitmap names alike.
pub fn select(available: &[MetaContext], queries: &[String], mode: QueryMode) -> Vec<MetaContext> {
    if queries.is_empty() {
        return match mode {
            QueryMode::List => available.to_vec(),
            QueryMode::Set => Vec::new(),
        };
    }
    available
        .iter()
        .filter(|ctx| queries.iter().any(|q| matches(ctx, q, mode)))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn names(ctxs: &[MetaContext]) -> Vec<String> {
        ctxs.iter().map(MetaContext::name).collect()
    }

    #[test]
    fn selection_rules() {
        let all = available(false, []);
        let base = vec![MetaContext::BaseAllocation];
        assert_eq!(select(&all, &[], QueryMode::List), base);
        assert!(select(&all, &[], QueryMode::Set).is_empty());
        assert_eq!(select(&all, &q(&["base:"]), QueryMode::List), base);
        assert!(select(&all, &q(&["base:"]), QueryMode::Set).is_empty());
        assert_eq!(select(&all, &q(&["base:allocation"]), QueryMode::Set), base);
        assert_eq!(
            select(
                &all,
                &q(&["base:allocation", "base:allocation"]),
                QueryMode::Set
            ),
            base
        );
        assert!(select(
            &all,
            &q(&["base:other", "x-foo:bar", "nocolon"]),
            QueryMode::Set
        )
        .is_empty());
        assert!(select(&all, &q(&["qemu:"]), QueryMode::List).is_empty());
    }

    #[test]
    fn qemu_contexts() {
        let all = available(true, ["b0", "b1"]);
        assert_eq!(
            names(&all),
            [
                "base:allocation",
                "qemu:allocation-depth",
                "qemu:dirty-bitmap:b0",
                "qemu:dirty-bitmap:b1"
            ]
        );
        assert_eq!(
            all.iter().map(MetaContext::id).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        assert_eq!(select(&all, &[], QueryMode::List), all);
        assert_eq!(select(&all, &q(&["qemu:"]), QueryMode::List), all[1..]);
        assert!(select(&all, &q(&["qemu:"]), QueryMode::Set).is_empty());
        assert_eq!(
            select(&all, &q(&["qemu:dirty-bitmap:"]), QueryMode::List),
            all[2..]
        );
        assert!(select(&all, &q(&["qemu:dirty-bitmap:"]), QueryMode::Set).is_empty());
        assert_eq!(
            names(&select(
                &all,
                &q(&[
                    "qemu:dirty-bitmap:b1",
                    "qemu:dirty-bitmap:nosuch",
                    "qemu:allocation-depth",
                    "qemu:other"
                ]),
                QueryMode::Set
            )),
            ["qemu:allocation-depth", "qemu:dirty-bitmap:b1"]
        );
        // Without allocation depth, the bitmaps keep QEMU's ids (2 + index).
        let bitmaps_only = available(false, ["x"]);
        assert_eq!(bitmaps_only[1].id(), 2);
        assert!(select(
            &bitmaps_only,
            &q(&["qemu:allocation-depth"]),
            QueryMode::Set
        )
        .is_empty());
    }
}
