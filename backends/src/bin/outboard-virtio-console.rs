fn main() -> std::process::ExitCode {
    outboard_backends::virtio_console::main(std::env::args_os())
}
