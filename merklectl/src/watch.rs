//! `merklectl up --watch DIR`: the system doing its job where a person can see it. DIR is
//! registered as a source, and each of its builds is printed as it completes: time, short
//! root, changed or unchanged, counts, duration, and for a change the paths DbSync's diff
//! names.

use std::{collections::HashSet, path::Path, time::Duration};

use merkle_proto::scheduler::v1::{
    CreateSourceRequest, ListBuildsRequest, scheduler_service_client::SchedulerServiceClient,
};
use merkle_shared::client::Channel;

use crate::{
    registry_name,
    remote::connect,
    sources::{AddArgs, build_line, changed_paths, source_from},
};

/// Follows the builds of the watched source.
pub struct Follow {
    scheduler: SchedulerServiceClient<Channel>,
    db_sync: String,
    source: String,
    seen: HashSet<String>,
}

impl Follow {
    /// Registers `dir` (an existing source of the same name is kept) and starts following.
    pub async fn start(
        scheduler: &str,
        db_sync: &str,
        dir: &Path,
        every: Duration,
    ) -> anyhow::Result<Follow> {
        let mut client = SchedulerServiceClient::new(connect(scheduler)?);
        let source = registry_name(dir);
        let add = AddArgs {
            name: source.clone(),
            path: dir.display().to_string(),
            every: Some(humantime::format_duration(every).to_string()),
            cron: None,
            tz: String::new(),
            exclude: Vec::new(),
            disabled: false,
            fleet: false,
            json: false,
        };
        match client
            .create_source(CreateSourceRequest {
                source: Some(source_from(&add)?),
            })
            .await
        {
            Ok(_) => {}
            Err(status) if status.code() == tonic::Code::AlreadyExists => {}
            Err(status) => return Err(crate::remote::call_failed("Scheduler", scheduler)(status)),
        }
        println!(
            "\nwatching {} as source {source}, built every {}; edit a file there to see it change\n",
            dir.display(),
            humantime::format_duration(every)
        );
        Ok(Follow {
            scheduler: client,
            db_sync: db_sync.to_owned(),
            source,
            seen: HashSet::new(),
        })
    }

    /// Prints the builds that completed since the last call, oldest first.
    pub async fn print_new(&mut self) {
        let Ok(page) = self
            .scheduler
            .list_builds(ListBuildsRequest {
                source: self.source.clone(),
                page_size: 20,
                page_token: String::new(),
                ..Default::default()
            })
            .await
        else {
            return;
        };
        for build in page.into_inner().builds.iter().rev() {
            if !crate::sources::is_done(build) || !self.seen.insert(build.build_id.clone()) {
                continue;
            }
            println!("{}", build_line(build));
            if let Ok(paths) = changed_paths(&self.db_sync, build).await {
                for line in paths.iter().take(50) {
                    println!("    {line}");
                }
                if paths.len() > 50 {
                    println!("    ... and {} more", paths.len() - 50);
                }
            }
        }
    }
}
