// Which .NET runtime this process is: Mono or CoreCLR (.NET Core 3.1, .NET 8
// and later). The library runs the same code on both; where they differ (the
// finalizer thread, how a native string in a struct is marshalled, process
// exit), the file concerned says so in its design notes.
using System;
using System.Runtime.InteropServices;

namespace EmbeddedWorker
{
    public static class DotNetRuntime
    {
        /// <summary>True on Mono, false on CoreCLR.</summary>
        public static readonly bool IsMono = Type.GetType("Mono.Runtime") != null;

        /// <summary>"Mono" or "CoreCLR".</summary>
        public static string Name { get { return IsMono ? "Mono" : "CoreCLR"; } }

        /// <summary>The runtime and its version, e.g. ".NET Core 3.1.23" or "Mono 6.8.0.105 (...)".</summary>
        public static string Description { get { return RuntimeInformation.FrameworkDescription; } }
    }
}
