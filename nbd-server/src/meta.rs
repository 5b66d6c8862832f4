//! Metadata contexts: which ones an export offers, and how queries select them.
//!
//! A small registry: [`MetaContext`] lists the kinds this server knows, each with a name and
//! a fixed id (the ids QEMU uses, so that traces compare). Only `base:allocation` exists
//! today; `qemu:allocation-depth` and `qemu:dirty-bitmap:NAME` slot in as further variants
//! with their own arm in [`available`] and in the block-status code of the connection.

/// A metadata context this server can serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaContext {
    /// `base:allocation`: `NBD_STATE_HOLE` and `NBD_STATE_ZERO` from block status.
    BaseAllocation,
}

impl MetaContext {
    /// The context's name as sent in `NBD_REP_META_CONTEXT`.
    pub fn name(&self) -> String {
        match self {
            MetaContext::BaseAllocation => "base:allocation".to_string(),
        }
    }

    /// The id sent by `NBD_OPT_SET_META_CONTEXT` and used in block status replies.
    pub fn id(&self) -> u32 {
        match self {
            MetaContext::BaseAllocation => 0,
        }
    }

    /// The namespace the context belongs to.
    fn namespace(&self) -> &'static str {
        match self {
            MetaContext::BaseAllocation => "base",
        }
    }
}

/// The contexts every export offers.
pub fn available() -> Vec<MetaContext> {
    vec![MetaContext::BaseAllocation]
}

/// Whether the query is for listing (`NBD_OPT_LIST_META_CONTEXT`) or selecting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryMode {
    /// `NBD_OPT_LIST_META_CONTEXT`: an empty leaf is a wildcard.
    List,
    /// `NBD_OPT_SET_META_CONTEXT`: only exact names select.
    Set,
}

/// The contexts of `available` that `queries` select, in registry order and without
/// duplicates. With no query, listing returns every context ("If zero queries are sent, then
/// the server MUST return all the metadata contexts that are available") and selecting
/// returns none ("If zero queries are sent, the server MUST select no metadata contexts").
/// Queries of unknown namespaces and unknown leaves are ignored: "the server MUST ignore
/// query strings belonging to an unknown namespace"; for `base:`, "If a `[leaf-name]`
/// requested by the client is not recognized, the server MUST ignore it".
pub fn select(available: &[MetaContext], queries: &[String], mode: QueryMode) -> Vec<MetaContext> {
    if queries.is_empty() {
        return match mode {
            QueryMode::List => available.to_vec(),
            QueryMode::Set => Vec::new(),
        };
    }
    available
        .iter()
        .filter(|ctx| {
            queries.iter().any(|q| {
                let name = ctx.name();
                if *q == name {
                    return true;
                }
                // `base:` (an empty leaf) is a wildcard when listing; "the server MUST
                // ignore this form during NBD_OPT_SET_META_CONTEXT".
                mode == QueryMode::List
                    && q.strip_suffix(':') == Some(ctx.namespace())
                    && q.len() == ctx.namespace().len() + 1
            })
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn selection_rules() {
        let all = available();
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
}
