fn main() -> std::process::ExitCode {
    outboard_backends::virtio_rng::main(std::env::args_os())
}
