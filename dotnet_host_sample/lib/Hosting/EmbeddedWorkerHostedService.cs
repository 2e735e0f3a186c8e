// SDK-only (Microsoft.Extensions.Hosting.Abstractions,
// Microsoft.Extensions.DependencyInjection.Abstractions; build.sh leaves
// lib/Hosting/ out). The generic host's IHostedService over
// EmbeddedWorkerService, which holds the lifetime itself: this adapter only
// forwards, so Mono builds and SDK builds start and stop the same way.
using System;
using System.Threading;
using System.Threading.Tasks;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;

namespace EmbeddedWorker
{
    public sealed class EmbeddedWorkerHostedService : IHostedService
    {
        readonly EmbeddedWorkerService service;

        public EmbeddedWorkerHostedService(EmbeddedWorkerService service)
        {
            this.service = service;
        }

        public Task StartAsync(CancellationToken cancellationToken) { return service.StartAsync(cancellationToken); }
        public Task StopAsync(CancellationToken cancellationToken) { return service.StopAsync(cancellationToken); }
    }

    public static class EmbeddedWorkerServiceCollectionExtensions
    {
        /// <summary>The worker's lifetime as a hosted service; EmbeddedWorkerService (its Worker) injectable.</summary>
        public static IServiceCollection AddEmbeddedWorker(this IServiceCollection services, string venvPath = null,
                                                           WorkerOptions options = null, TimeSpan? stopTimeout = null)
        {
            var service = new EmbeddedWorkerService(venvPath, options);
            if (stopTimeout.HasValue) service.StopTimeout = stopTimeout.Value;
            services.AddSingleton(service);
            services.AddSingleton<IHostedService>(provider => new EmbeddedWorkerHostedService(service));
            return services;
        }
    }
}
