// The sample host: ServiceProcessing's worker, in process. Main starts the
// runtime, runs the one mode the arguments name, and disposes the runtime
// (the safe shutdown) whatever the mode did. `run.sh [--runtime mono|coreclr]`
// starts it on Mono or CoreCLR (the same exe); the first line says which.
//
//   run.sh [--venv PATH] [--out DIR] [--summary FILE]   Demo.cs
//   run.sh --selftest [pytest arguments]                 SelfTest.cs
//   run.sh --bench FILE                                  HostBenchmarks.cs
//   run.sh --check-async                                 AsyncChecks.cs
//   run.sh --leak-test THREADS                           LeakTest.cs
//   run.sh --hold-batch ID [--items N]                   CrashTestHost.cs
//   run.sh --service-lifetime [--cancel-during-start]    ServiceLifetime.cs (starts Python itself)
using System;
using System.Diagnostics;
using EmbeddedWorker;

namespace EmbeddedWorkerHost
{
    public static class Program
    {
        /// <summary>Milliseconds from the process's start to Main (the .NET runtime's own start), and Main to Python up.</summary>
        public static double RuntimeStartMs, PythonStartMs;

        public static int Main(string[] args)
        {
            var clock = Stopwatch.StartNew();
            RuntimeStartMs = (DateTime.Now - Process.GetCurrentProcess().StartTime).TotalMilliseconds;
            Console.WriteLine("host runtime: " + DotNetRuntime.Name + " (" + DotNetRuntime.Description + ")");
            if (Array.IndexOf(args, "--service-lifetime") >= 0)
                return Array.IndexOf(args, "--cancel-during-start") >= 0 ? ServiceLifetime.CancelDuringStart(Option(args, "--venv"))
                                                                        : ServiceLifetime.Run(Option(args, "--venv"));
            PythonRuntime runtime;
            try
            {
                runtime = PythonRuntime.Start(Option(args, "--venv"));
                PythonStartMs = clock.Elapsed.TotalMilliseconds;
            }
            catch (Exception error)
            {
                Console.Error.WriteLine("cannot start Python: " + error.Message);
                return 2;
            }
            try
            {
                if (Array.IndexOf(args, "--selftest") >= 0) return SelfTest.Run(runtime, After(args, "--selftest"));
                if (Option(args, "--bench") != null) return HostBenchmarks.Run(runtime, Option(args, "--bench"));
                if (Array.IndexOf(args, "--check-async") >= 0) return AsyncChecks.Run(runtime);
                if (Option(args, "--leak-test") != null) return LeakTest.Run(runtime, int.Parse(Option(args, "--leak-test")));
                if (Option(args, "--hold-batch") != null)
                    return CrashTestHost.Run(runtime, Option(args, "--hold-batch"), int.Parse(Option(args, "--items") ?? "8"));
                return Demo.Run(runtime, Option(args, "--out") ?? "demo_output", Option(args, "--summary"));
            }
            finally
            {
                var shutdown = Stopwatch.StartNew();
                runtime.Dispose();  // closes the worker (joins its threads), then PythonEngine.Shutdown()
                if (Option(args, "--bench") != null)
                    Console.WriteLine("shutdown_ms=" + shutdown.Elapsed.TotalMilliseconds.ToString("F1", System.Globalization.CultureInfo.InvariantCulture));
            }
        }

        static string Option(string[] args, string name)
        {
            int at = Array.IndexOf(args, name);
            return at >= 0 && at + 1 < args.Length ? args[at + 1] : null;
        }

        /// <summary>The arguments after `name`, handed on as they are.</summary>
        static string[] After(string[] args, string name)
        {
            int from = Array.IndexOf(args, name) + 1;
            var rest = new string[args.Length - from];
            Array.Copy(args, from, rest, 0, rest.Length);
            return rest;
        }
    }
}
