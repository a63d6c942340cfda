fn main() -> std::process::ExitCode {
    outboard_backends::scratch::main(std::env::args_os())
}
