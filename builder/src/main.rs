use clap::Parser;

fn main() {
    let cli = labforge::cli::Cli::parse();
    labforge::cli::init_logging(cli.verbose);
    if let Err(e) = labforge::interrupt::install().and_then(|()| labforge::cli::run(cli)) {
        eprintln!("labforge: error: {e:#}");
        std::process::exit(if labforge::interrupt::is_interrupted(&e) { 130 } else { 1 });
    }
}
