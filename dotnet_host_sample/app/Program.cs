// The sample host: ServiceProcessing's worker, in process. Main starts the
// runtime, runs the one mode the arguments name, and disposes the runtime
// (the safe shutdown) whatever the mode did.
//
//   mono EmbeddedWorkerHost.exe [--venv PATH] [--out DIR] [--summary FILE]   Demo.cs
//   mono EmbeddedWorkerHost.exe --selftest [pytest arguments]                 SelfTest.cs
//   mono EmbeddedWorkerHost.exe --bench FILE                                  HostBenchmarks.cs
//   mono EmbeddedWorkerHost.exe --check-async                                 AsyncChecks.cs
//   mono EmbeddedWorkerHost.exe --leak-test THREADS                           LeakTest.cs
//   mono EmbeddedWorkerHost.exe --hold-batch ID [--items N]                   CrashTestHost.cs
using System;
using EmbeddedWorker;

namespace EmbeddedWorkerHost
{
    public static class Program
    {
        public static int Main(string[] args)
        {
            PythonRuntime runtime;
            try
            {
                runtime = PythonRuntime.Start(Option(args, "--venv"));
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
                runtime.Dispose();  // closes the worker (joins its threads), then PythonEngine.Shutdown()
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
