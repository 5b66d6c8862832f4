//! Starts the tests' throwaway one-node Ceph cluster (`blockexportd_tests::ceph`) for a
//! benchmark or a manual experiment: prints the path of its `ceph.conf` on stdout, then runs
//! until its stdin is closed (or it is killed), and takes the cluster down with it.
//!
//! ```sh
//! cargo build --release -p blockexportd-tests --bin ceph-cluster
//! target/release/ceph-cluster    # prints /tmp/ceph-testXXXX/ceph.conf; Ctrl-D ends it
//! ```

use std::io::Read;

fn main() {
    let cluster = blockexportd_tests::ceph::Cluster::start();
    println!("{}", cluster.conf.display());
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(cluster);
}
