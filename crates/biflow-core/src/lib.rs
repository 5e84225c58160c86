//! biflow-core: all the maths and I/O of biflow. The Node shell (`biflow-node`) only forwards
//! `jobs::run(name, options, ctx)` calls here.

pub mod bpd;
pub mod bundle;
pub mod data;
pub mod demo;
pub mod device;
pub mod distill;
pub mod edit;
pub mod eval_reverse;
pub mod fid;
pub mod flow;
pub mod import;
pub mod io;
pub mod job;
pub mod judge;
pub mod jobs;
pub mod grad;
pub mod ops;
pub mod optim;
pub mod reverse;
pub mod report;
pub mod run;
pub mod runs;
pub mod sample;
pub mod train;
pub mod trainer;

pub use job::{Cancelled, Event, JobCtx};
