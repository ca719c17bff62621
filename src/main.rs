use clap::Parser;

fn main() {
    let mut log =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    // Under systemd the journal stamps every line itself: no second timestamp.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        log.format_timestamp(None);
    }
    log.init();
    ferry::fault::setup();
    let cli = ferry::cli::Cli::parse_from(ferry::cli::helper_args(std::env::args_os().collect()));
    if let Err(e) = ferry::cli::run(cli) {
        eprintln!("ferry: {e:#}");
        std::process::exit(1);
    }
}
