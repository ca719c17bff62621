use clap::Parser;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = ferry::cli::Cli::parse_from(ferry::cli::helper_args(std::env::args_os().collect()));
    if let Err(e) = ferry::cli::run(cli) {
        eprintln!("ferry: {e:#}");
        std::process::exit(1);
    }
}
