fn main() -> std::process::ExitCode {
    outboard_backends::uart::main(std::env::args_os())
}
